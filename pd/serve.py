"""``pd-serve``: one instance = an API server (this process) + an engine-core
process per DP rank (one for now), joined over ZMQ on the engine-worker-queue port.

Start-up: parse and validate flags, start the engine process, load the
tokenizer, wait until the engine reports its model loaded, and only then open
the API port. SIGTERM/SIGINT drain in-flight requests (bounded) and exit 0;
a dead engine process fails in-flight requests, and the server exits 1.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import sys
from typing import TYPE_CHECKING

from pd.args import ServeArgs, parse_args, pick_free_port
from pd.cluster_instance import cluster_instance
from pd.cluster_secret import engine_channel_key
from pd.cpu_threads import apply_api_server_threads, engine_thread_choice

if TYPE_CHECKING:
    from pd.rank.settings import RankSettings

logger = logging.getLogger("pd.serve")

_READY_TIMEOUT_S = 1800.0  # model loading can be slow on big checkpoints
_DRAIN_TIMEOUT_S = 30
_ENGINE_STOP_TIMEOUT_S = 10.0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cluster"]:
        from pd.cluster import main as cluster_main

        sys.exit(cluster_main(argv[1:]))
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(asyncio.run(serve(args)))


def engine_kwargs(args: ServeArgs) -> dict:
    return {
        "model": args.model,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "num_gpu_blocks_override": args.num_gpu_blocks_override,
        "block_size": args.block_size,
        "device": args.device,
        "seed": args.seed,
        "enable_prefix_caching": args.enable_prefix_caching,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "load_format": args.load_format,
        "attention_backend": args.attention_backend,
        "enforce_eager": args.enforce_eager,
        # A prefill/decode rank shares its blocks with peers: it steps synchronously.
        "async_scheduling": args.async_scheduling and args.splitwise_role == "mixed",
        "tensor_parallel_size": args.tensor_parallel_size,
    }


def start_engine(
    args: ServeArgs, settings: RankSettings | None = None, channel_key: bytes | None = None
) -> tuple[multiprocessing.Process, str]:
    from pd.engine_process import run_engine_process

    port = args.engine_worker_queue_ports[0]
    port = port or pick_free_port()
    address = f"tcp://127.0.0.1:{port}"
    threads = engine_thread_choice(
        args.engine_threads,
        num_engines=args.data_parallel_size * args.tensor_parallel_size,
        num_api_servers=len(args.ports),
    )
    process = multiprocessing.get_context("spawn").Process(
        target=run_engine_process,
        args=(engine_kwargs(args), address, args.log_level, threads, settings, channel_key),
        name="pd-engine-0",
        # Not daemonic: it starts TP worker processes. It stops with us all the same:
        # _stop_engine on every exit path, and it watches our pid in case we are killed.
        daemon=False,
    )
    process.start()
    logger.info("engine core (DP rank 0) pid %d on %s", process.pid, address)
    return process, address


async def serve(args: ServeArgs) -> int:
    import uvicorn

    from engine.tokenizer import load_tokenizer
    from pd.api.server import build_app
    from pd.api.state import ServerState
    from pd.engine_client import EngineClient, EngineDeadError
    from scheduler.redis_link import SchedulerUnavailable

    logger.info(apply_api_server_threads())
    api_port = args.api_port or pick_free_port(args.host)
    instance = cluster_instance(args, api_port) if args.scheduler_name == "splitwise" else None
    channel_key = engine_channel_key(args.cluster_secret())
    process, address = start_engine(args, instance.rank_settings if instance else None, channel_key)
    try:
        state = ServerState.create(args, load_tokenizer(args.model))
        if instance is None:
            client = EngineClient(address, state.tokenizer, state.timings())
        else:
            from pd.splitwise_client import SplitwiseEngineClient

            client = SplitwiseEngineClient(
                address, state.tokenizer, state.timings(), args.scheduler_config(), instance.api_id
            )
        client.channel_key = channel_key
        state.engine = client
        info = await client.wait_ready(process.is_alive, _READY_TIMEOUT_S)
    except (EngineDeadError, ValueError, OSError, SchedulerUnavailable) as error:
        logger.error("start-up failed: %s", error)
        _stop_engine(process)
        return 1
    state.max_model_len = info.max_model_len
    servers = _make_servers(args, api_port, build_app(state), state, uvicorn)
    # NOTE: uvicorn captures SIGINT/SIGTERM while serving, drains, restores the
    # previous handlers and raises the signal again; ours make that a no-op, so
    # a drained shutdown exits 0 instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    watcher = asyncio.create_task(_watch(process, client, servers))
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        watcher.cancel()
        await client.shutdown()
        _stop_engine(process)
    return 1 if client.dead_reason else 0


def _make_servers(args: ServeArgs, port: int, app, state, uvicorn) -> list:
    servers = [_server(uvicorn, app, args.host, port, args.log_level)]
    logger.info("OpenAI API on http://%s:%d/v1 (model %s)", args.host, port, state.model_names[0])
    if args.metrics_port is not None:
        metrics_port = args.metrics_port or pick_free_port(args.host)
        from pd.api.errors import install_error_handlers
        from pd.api.server import api_key_dependencies

        metrics_app = state.metrics.make_metrics_app(api_key_dependencies(args.api_key))
        install_error_handlers(metrics_app)
        servers.append(_server(uvicorn, metrics_app, args.host, metrics_port, args.log_level))
        logger.info("metrics on http://%s:%d/metrics", args.host, metrics_port)
    return servers


def _server(uvicorn, app, host: str, port: int, log_level: str):
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=_DRAIN_TIMEOUT_S,
        access_log=False,
    )
    return uvicorn.Server(config)


async def _watch(process: multiprocessing.Process, client, servers: list) -> None:
    """Say when every server listens; stop them all when one stops (a signal
    reaches one of them) or when the engine process dies."""
    announced = False
    while process.is_alive() and not any(server.should_exit for server in servers):
        if not announced and all(server.started for server in servers):
            config = servers[0].config
            print(f"pd-serve ready: http://{config.host}:{config.port}/v1", flush=True)
            announced = True
        await asyncio.sleep(0.2)
    if not process.is_alive():
        client.mark_dead(_exit_reason(process.exitcode))
    for server in servers:
        server.should_exit = True


def _exit_reason(exitcode: int | None) -> str:
    from pd.engine_process import WORKER_DIED_EXIT_CODE

    if exitcode == WORKER_DIED_EXIT_CODE:
        return "a tensor-parallel worker of the engine died (see the engine's log)"
    return f"engine process exited with code {exitcode}"


def _stop_engine(process: multiprocessing.Process) -> None:
    if process.is_alive():
        process.join(_ENGINE_STOP_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()


if __name__ == "__main__":
    main()
