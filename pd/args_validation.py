"""Checks for ``pd-serve`` flags: value parsers for argparse, then whole-config checks.

Standard library only, like ``pd.args``. Value parsers raise
``argparse.ArgumentTypeError`` (argparse names the flag); config checks raise
``ValueError`` with one line that names the flags involved.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pd.args import ServeArgs

MAX_PORT = 65535
TRANSFER_PROTOCOLS = ("rdma", "ipc", "tcp")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


# ---- value parsers (argparse ``type=``) -------------------------------------


def parse_port(text: str) -> int:
    """A TCP port, 0..65535; 0 means "pick a free port at start-up"."""
    try:
        port = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0..{MAX_PORT}")
    return port


def parse_port_list(text: str) -> list[int]:
    """Comma-separated ports, as in the FastDeploy docs: "8001,8002"."""
    entries = text.split(",")
    if any(not entry.strip() for entry in entries):
        raise argparse.ArgumentTypeError(
            f"{text!r} has an empty entry (expected comma-separated ports, e.g. 8001,8002)"
        )
    return [parse_port(entry) for entry in entries]


def parse_size(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def parse_non_negative(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def parse_fraction(text: str) -> float:
    """A float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def parse_protocols(text: str) -> list[str]:
    """Comma-separated KV transfer protocols, e.g. "rdma,ipc"; order kept, repeats dropped."""
    names = [entry.strip().lower() for entry in text.split(",")]
    unknown = [name for name in names if name not in TRANSFER_PROTOCOLS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown protocol {unknown[0]!r} (choose from {', '.join(TRANSFER_PROTOCOLS)})"
        )
    return list(dict.fromkeys(names))


def parse_host_port(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6addr]:port`` for IPv6) with a port in 1..65535."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port (e.g. 10.0.0.1:30000)")
    port = int(port_text)
    if not 1 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"port {port} in {text!r} is outside 1..{MAX_PORT}")
    return host, port


def parse_device(text: str) -> str:
    """auto, cpu, cuda or cuda:N."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda, cuda:N")
    return text


# ---- whole-config checks -----------------------------------------------------


def check_combinations(args: ServeArgs, given: frozenset[str]) -> None:
    """Reject flag combinations that can never work; ``given`` holds the dests set explicitly."""
    _check_port_list_lengths(args, given)
    _check_no_port_reuse(args, given)
    is_split = args.splitwise_role in ("prefill", "decode")
    if is_split and args.scheduler_name == "local" and args.router is None:
        raise ValueError(
            f"--splitwise-role {args.splitwise_role} with --scheduler-name local needs "
            "--scheduler-name splitwise or --router (a local scheduler cannot reach "
            "the other role)"
        )
    if is_split and args.async_scheduling and "async_scheduling" in given:
        raise ValueError(
            f"--async-scheduling is for mixed instances: a {args.splitwise_role} rank shares "
            "its KV blocks with peers, so it steps synchronously"
        )


def _check_port_list_lengths(args: ServeArgs, given: frozenset[str]) -> None:
    dp = args.data_parallel_size
    per_rank = {
        "ports": ("--ports", args.ports),
        "metrics_ports": ("--metrics-ports", args.metrics_ports or []),
        "engine_worker_queue_ports": ("--engine-worker-queue-port", args.engine_worker_queue_ports),
        "cache_queue_ports": ("--cache-queue-port", args.cache_queue_ports),
        "pd_comm_ports": ("--pd-comm-port", args.pd_comm_ports),
    }
    for dest, (flag, ports) in per_rank.items():
        if dest in given and len(ports) != dp:
            raise ValueError(
                f"{flag} has {_count(ports)} but --data-parallel-size is {dp} "
                "(one port per DP rank)"
            )
    num_gpus = dp * args.tensor_parallel_size
    if "rdma_comm_ports" in given and len(args.rdma_comm_ports) != num_gpus:
        raise ValueError(
            f"--rdma-comm-ports has {_count(args.rdma_comm_ports)} but the instance has "
            f"{_plural(num_gpus, 'GPU')} (--data-parallel-size {dp} x --tensor-parallel-size "
            f"{args.tensor_parallel_size}; one port per GPU)"
        )


def _count(ports: list[int]) -> str:
    return _plural(len(ports), "port")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _check_no_port_reuse(args: ServeArgs, given: frozenset[str]) -> None:
    owner: dict[int, str] = {}
    for flag, port in _listening_ports(args, given):
        if port == 0:  # picked free at start-up, so never a clash
            continue
        if port in owner:
            where = f"twice in {flag}" if owner[port] == flag else f"by {owner[port]} and {flag}"
            raise ValueError(f"port {port} is used {where}; each listening port must differ")
        owner[port] = flag


def _listening_ports(args: ServeArgs, given: frozenset[str]) -> Iterator[tuple[str, int]]:
    """Every port this host listens on, labelled with the flag that set it."""
    api_flag = "--ports" if "ports" in given else "--port"
    yield from ((api_flag, port) for port in args.ports)
    if args.metrics_port is not None:
        yield "--metrics-port", args.metrics_port
    lists = (
        ("--metrics-ports", args.metrics_ports or []),
        ("--engine-worker-queue-port", args.engine_worker_queue_ports),
        ("--cache-queue-port", args.cache_queue_ports),
        ("--rdma-comm-ports", args.rdma_comm_ports),
        ("--pd-comm-port", args.pd_comm_ports),
    )
    for flag, ports in lists:
        yield from ((flag, port) for port in ports)


def check_supported(args: ServeArgs, given: frozenset[str]) -> None:
    """Reject features whose implementation lands in a later issue (never ignore them)."""
    unsupported = [
        (
            args.data_parallel_size > 1,
            "data parallelism",
            f"--data-parallel-size {args.data_parallel_size}",
        ),
        (args.enable_expert_parallel, "expert parallelism", "--enable-expert-parallel"),
        (args.router is not None, "registering with pd-router", "--router"),
        (args.metrics_ports is not None, "one metrics server per DP rank", "--metrics-ports"),
    ]
    for is_used, what, flag in unsupported:
        if is_used:
            raise ValueError(f"not supported yet: {what} ({flag})")
