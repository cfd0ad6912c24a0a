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

from pd.dp_layout import MAX_PORT, RANK_PORT_FLAGS

if TYPE_CHECKING:
    from pd.args import ServeArgs

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
    _check_blocks_hold_one_sequence(args)
    _check_transfer_ports_have_a_role(args, given)
    is_split = args.splitwise_role in ("prefill", "decode")
    if is_split and args.scheduler_name == "local" and args.router is None:
        raise ValueError(
            f"--splitwise-role {args.splitwise_role} with --scheduler-name local needs "
            "--scheduler-name splitwise or --router (a local scheduler cannot reach "
            "the other role)"
        )
    if args.paired_by_router and args.scheduler_name == "splitwise":
        raise ValueError(
            f"--router with --splitwise-role {args.splitwise_role} pairs prefill and decode "
            "through pd-router --splitwise, without Redis: leave out --scheduler-name "
            "splitwise (or leave out --router to pair through Redis)"
        )
    if is_split and args.async_scheduling and "async_scheduling" in given:
        raise ValueError(
            f"--async-scheduling is for mixed instances: a {args.splitwise_role} rank shares "
            "its KV blocks with peers, so it steps synchronously"
        )


def _check_port_list_lengths(args: ServeArgs, given: frozenset[str]) -> None:
    layout = args.dp_layout  # raises on ranks past --data-parallel-size
    num_servers = len(args.ports)
    if num_servers not in (1, layout.local):
        raise ValueError(
            f"--ports has {_count(args.ports)} for {_plural(layout.local, 'DP rank')}: give "
            "one (one API server for all of them) or one per DP rank (an API server each)"
        )
    if args.metrics_ports is not None and len(args.metrics_ports) != num_servers:
        raise ValueError(
            f"--metrics-ports has {_count(args.metrics_ports)} for "
            f"{_plural(num_servers, 'API server')} (--ports): one per API server"
        )
    if num_servers > 1 and args.metrics_port is not None:
        raise ValueError(
            f"--metrics-port is one port for {num_servers} API servers (--ports): give "
            "--metrics-ports, one per server"
        )
    for dest in RANK_PORT_FLAGS:
        args.rank_ports(dest)  # raises on a count that fits no reading
    if layout.spans_processes and not args.data_parallel_rpc_port:
        raise ValueError(
            f"this process runs DP ranks {layout.start}..{layout.start + layout.local - 1} of "
            f"{layout.size}: the others need a meeting point, --data-parallel-address and "
            "--data-parallel-rpc-port (DP rank 0's host and a free port there)"
        )


def _check_blocks_hold_one_sequence(args: ServeArgs) -> None:
    """The engine refuses at start-up a KV cache that cannot hold one --max-model-len
    sequence; with both sizes given that is known now."""
    blocks, length = args.num_gpu_blocks_override, args.max_model_len
    if blocks is None or length is None or blocks * args.block_size >= length:
        return
    needed = -(-length // blocks)
    raise ValueError(
        f"--num-gpu-blocks-override {blocks} blocks of --block-size {args.block_size} tokens "
        f"hold {blocks * args.block_size} tokens, fewer than one --max-model-len {length} "
        f"sequence: give more blocks, or blocks of at least {needed} tokens (FastDeploy's "
        "blocks are 64 tokens: --block-size 64)"
    )


def _check_transfer_ports_have_a_role(args: ServeArgs, given: frozenset[str]) -> None:
    """A mixed instance runs whole requests: it serves no pd-comm and moves no KV. Ports
    for those mean a prefill or decode instance was meant (a FastDeploy doc's decode
    command loses its --splitwise-role to a missing line continuation)."""
    if args.splitwise_role != "mixed":
        return
    dests = [dest for dest in ("pd_comm_ports", "rdma_comm_ports") if dest in given]
    if not dests:
        return
    flags = " and ".join(RANK_PORT_FLAGS[dest][0] for dest in dests)
    verb = "is" if len(dests) == 1 else "are"
    role = "mixed (--splitwise-role mixed)"
    if "splitwise_role" not in given:
        role = "mixed: --splitwise-role is left out (did the command line end early?)"
    raise ValueError(
        f"{flags} {verb} for --splitwise-role prefill or decode; this instance is {role}"
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
    """Every port this process listens on, labelled with the flag that set it."""
    api_flag = "--ports" if "ports" in given else "--port"
    yield from ((api_flag, port) for port in args.ports)
    if args.metrics_port is not None:
        yield "--metrics-port", args.metrics_port
    yield from (("--metrics-ports", port) for port in args.metrics_ports or [])
    for dest, (flag, _) in RANK_PORT_FLAGS.items():
        for ports in args.rank_ports(dest).per_rank:
            yield from ((flag, port) for port in ports)
    if args.data_parallel_start_rank == 0:  # DP rank 0 hosts the DP group
        yield "--data-parallel-rpc-port", args.data_parallel_rpc_port
