"""``pd-router``'s flags, parsed and checked into one frozen config."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pd.args import OneLineParser
from pd.router.policy import POLICY_NAMES


@dataclass(frozen=True)
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 30000
    api_key: str | None = None  # what clients of the router present
    instance_api_key: str | None = None  # what the router presents to the instances
    cluster_secret: bytes | None = None  # registration needs its token when set
    policy: str = "round_robin"  # how a mixed instance is picked
    splitwise: bool = False  # pair a prefill and a decode instance per request
    prefill_policy: str = "round_robin"  # with splitwise (the flag defaults to --policy)
    decode_policy: str = "round_robin"  # with splitwise (the flag defaults to --policy)
    health_interval_s: float = 1.0  # probes of /health and the instances' heartbeats
    instance_timeout_s: float = 5.0  # silent this long, an instance is not picked
    forget_after_s: float = 60.0  # silent this long, it is forgotten
    cache_aware_max_load_gap: int = 8
    cache_aware_min_prefix_chars: int = 16
    log_level: str = "info"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pd-router",
        description="An OpenAI-compatible front for pd-serve instances: they register "
        "(pd-serve --router HOST:PORT), the router picks one per request (with --splitwise "
        "a prefill and a decode instance) and streams its answer back.",
        allow_abbrev=False,
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=30000, help="(default: 30000)")
    parser.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY'")
    parser.add_argument("--instance-api-key", metavar="KEY",
                        help="the --api-key of the instances, sent with forwarded "
                        "requests")  # fmt: skip
    parser.add_argument("--cluster-secret-file", metavar="PATH",
                        help="registration must prove this secret (default: "
                        "PD_CLUSTER_SECRET; neither: anyone may register)")  # fmt: skip
    parser.add_argument("--policy", choices=POLICY_NAMES, default="round_robin",
                        help="how an instance is picked (default: round_robin)")  # fmt: skip
    parser.add_argument("--prefill-policy", choices=POLICY_NAMES,
                        help="how a prefill instance is picked (with --splitwise; "
                        "default: --policy)")  # fmt: skip
    parser.add_argument("--decode-policy", choices=POLICY_NAMES,
                        help="how a decode instance is picked (with --splitwise; "
                        "default: --policy)")  # fmt: skip
    parser.add_argument("--splitwise", action="store_true",
                        help="pair a prefill and a decode instance per request (they "
                        "register with --splitwise-role prefill|decode; no Redis)")  # fmt: skip
    parser.add_argument("--health-interval", type=float, default=1.0, metavar="S",
                        help="seconds between health probes and heartbeats "
                        "(default: 1)")  # fmt: skip
    parser.add_argument("--instance-timeout", type=float, default=5.0, metavar="S",
                        help="an instance silent this long is not picked (default: 5)")  # fmt: skip
    parser.add_argument("--cache-aware-max-load-gap", type=int, default=8, metavar="N",
                        help="cache_aware: prefix affinity yields when its instance has "
                        "more than N requests over the least loaded (default: 8)")  # fmt: skip
    parser.add_argument("--cache-aware-min-prefix", type=int, default=16, metavar="CHARS",
                        help="cache_aware: the shortest shared prefix that counts "
                        "(default: 16)")  # fmt: skip
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])  # fmt: skip
    return parser


def parse_router_args(argv: list[str]) -> RouterConfig:
    """The config of ``argv``; exits 2 with one line on a bad flag."""
    from pd.cluster_secret import load_cluster_secret

    parser = build_parser()
    options = parser.parse_args(argv)
    for flag, value in (("--prefill-policy", options.prefill_policy),
                        ("--decode-policy", options.decode_policy)):  # fmt: skip
        if value is not None and not options.splitwise:
            parser.error(f"{flag} is for prefill/decode pairs (--splitwise)")
    if not 1 <= options.port <= 65535:
        parser.error(f"--port {options.port} is outside 1..65535")
    if options.health_interval <= 0 or options.instance_timeout <= options.health_interval:
        parser.error("--instance-timeout must exceed --health-interval, both > 0")
    try:
        secret = load_cluster_secret(options.cluster_secret_file)
    except ValueError as error:
        parser.error(str(error))
    return RouterConfig(
        host=options.host, port=options.port, api_key=options.api_key,
        instance_api_key=options.instance_api_key, cluster_secret=secret,
        policy=options.policy, splitwise=options.splitwise,
        prefill_policy=options.prefill_policy or options.policy,
        decode_policy=options.decode_policy or options.policy,
        health_interval_s=options.health_interval,
        instance_timeout_s=options.instance_timeout,
        forget_after_s=max(60.0, 10 * options.instance_timeout),
        cache_aware_max_load_gap=options.cache_aware_max_load_gap,
        cache_aware_min_prefix_chars=options.cache_aware_min_prefix,
        log_level=options.log_level,
    )  # fmt: skip
