"""Start ``pd-router`` (also ``python -m pd.router``)."""

from __future__ import annotations

import logging
import signal
import sys

from pd.router.config import RouterConfig, parse_router_args

logger = logging.getLogger("pd.router")


def main(argv: list[str] | None = None) -> None:
    config = parse_router_args(sys.argv[1:] if argv is None else argv)
    sys.exit(run_router(config))


def run_router(config: RouterConfig) -> int:
    import uvicorn

    from pd.router.app import Router, build_router_app

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per probe
    if config.cluster_secret is None:
        logger.warning("no cluster secret (--cluster-secret-file, PD_CLUSTER_SECRET): any "
                       "process that reaches this port can register an instance")  # fmt: skip
    app = build_router_app(Router(config))
    uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port,
                                    log_level=config.log_level, access_log=False)  # fmt: skip
    server = uvicorn.Server(uvicorn_config)
    if config.splitwise:
        policies = (f"prefill/decode pairs, prefill policy {config.prefill_policy}, "
                    f"decode policy {config.decode_policy}")  # fmt: skip
    else:
        policies = f"policy {config.policy}"
    logger.info("%s; OpenAI API on http://%s:%d/v1", policies, config.host, config.port)
    _announce_when_started(server, config)
    # NOTE: uvicorn captures SIGINT/SIGTERM while serving, then raises them again once
    # it has shut down; no-op handlers make that a clean exit 0 (as pd-serve does).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0


def _announce_when_started(server, config: RouterConfig) -> None:  # type: ignore[no-untyped-def]
    """Print "pd-router ready" once uvicorn listens (launchers and tests wait for it)."""
    startup = server.startup

    async def startup_then_announce(sockets=None):  # type: ignore[no-untyped-def]
        await startup(sockets=sockets)
        if server.started:
            print(f"pd-router ready: http://{config.host}:{config.port}/v1", flush=True)

    server.startup = startup_then_announce


if __name__ == "__main__":
    main()
