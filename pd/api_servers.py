"""One API server per DP rank (FastDeploy's multi-API-server).

``pd-serve --data-parallel-size N --ports p1,..,pN`` and ``pd-serve multi-api-server
--num-servers N --ports p1,..,pN [--metrics-ports m1,..,mN] --args <pd-serve flags>``
(also ``python -m pd.multi_api_server``) start N API servers, each a ``pd-serve`` of one
DP rank of the same instance: its own port, metrics port and engine, and the rank's
entries of every per-rank port list. The ranks meet in one DP group at
``--data-parallel-address``/``--data-parallel-rpc-port`` (a free port when left out).
Clients, or a balancer in front, pick a server; nothing here balances.

This process only starts and stops them: SIGINT/SIGTERM reach every server, which
drains. A server that exits leaves the others serving (DP ranks share nothing); once
all have exited this process exits with the worst exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import sys
import time

from pd.args import OneLineParser, ServeArgs, parse_args, pick_free_port
from pd.args_validation import parse_port_list, parse_size
from pd.cpu_threads import engine_thread_choice
from pd.dp_layout import RANK_PORT_FLAGS

logger = logging.getLogger("pd.serve")

_POLL_S = 0.2
_STOP_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class Launcher:
    """What a started API server knows of the process that started it."""

    pid: int  # the server stops when this process is gone
    ready: multiprocessing.Queue  # the server puts (dp rank, its URL) once it listens


def server_args(args: ServeArgs, index: int, dp_rpc_port: int) -> ServeArgs:
    """The flags of the API server of this process's ``index``-th DP rank."""
    dp_rank = args.dp_layout.ranks[index]
    ports = {dest: list(args.rank_ports(dest).per_rank[index]) for dest in RANK_PORT_FLAGS}
    metrics_port = args.metrics_ports[index] if args.metrics_ports else None
    return dataclasses.replace(
        args,
        engine_threads=_engine_threads(args),
        ports=[args.ports[index]],
        metrics_port=metrics_port,
        metrics_ports=None,
        data_parallel_start_rank=dp_rank,
        data_parallel_size_local=1,
        data_parallel_rpc_port=dp_rpc_port,
        data_parallel_local_offset=args.data_parallel_local_offset + index,  # its GPUs
        **ports,
    )


def _engine_threads(args: ServeArgs) -> int:
    """--engine-threads for each server: the servers share this host's cores, so the
    automatic choice counts all of them (a server alone would take every core)."""
    if args.engine_threads:
        return args.engine_threads
    local = args.dp_layout.local
    choice = engine_thread_choice(0, num_engines=local * args.tensor_parallel_size,
                                  num_api_servers=local)  # fmt: skip
    return choice.num_threads if choice.source == "auto" else 0


def run_api_servers(args: ServeArgs) -> int:
    """Start one API server per local DP rank and wait for them all to exit."""
    from pd.flag_notes import flag_notes

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for note in flag_notes(args):  # once here: each server gets its rank's ports only
        logger.info("%s", note)
    args = dataclasses.replace(
        args, ports=[port or pick_free_port(args.host) for port in args.ports]
    )
    rpc_port = args.data_parallel_rpc_port or pick_free_port(args.data_parallel_address)
    context = multiprocessing.get_context("spawn")
    launcher = Launcher(os.getpid(), context.Queue())
    servers = []
    for index, dp_rank in enumerate(args.dp_layout.ranks):
        process = context.Process(
            target=_serve_one,
            args=(server_args(args, index, rpc_port), launcher),
            name=f"pd-api-server-{dp_rank}",
            daemon=False,  # it starts its engine process
        )
        process.start()
        logger.info("API server of DP rank %d: pid %d, port %d", dp_rank, process.pid,
                    args.ports[index])  # fmt: skip
        servers.append((dp_rank, process))
    return _supervise(servers, launcher)


def _serve_one(args: ServeArgs, launcher: Launcher) -> None:
    """A spawned API server: its exit status is ``run_one``'s (a process target's return
    value is dropped, which made a server that failed its start-up exit 0)."""
    from pd.serve import run_one

    sys.exit(run_one(args, launcher))


def _supervise(servers: list, launcher: Launcher) -> int:  # type: ignore[type-arg]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for _, process in servers:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    urls: dict[int, str] = {}
    running = dict(servers)
    exit_codes: list[int] = []
    while running:
        _collect_ready(launcher, urls, len(servers))
        for dp_rank, process in list(running.items()):
            if process.is_alive():
                continue
            del running[dp_rank]
            code = process.exitcode or 0
            exit_codes.append(code if code >= 0 else 1)
            if not stopping:
                logger.error("the API server of DP rank %d exited with code %s; %d still serve",
                             dp_rank, process.exitcode, len(running))  # fmt: skip
        time.sleep(_POLL_S)
    return max(exit_codes, default=0)


def _collect_ready(launcher: Launcher, urls: dict[int, str], num_servers: int) -> None:
    while True:
        try:
            dp_rank, url = launcher.ready.get_nowait()
        except queue.Empty:
            return
        urls[dp_rank] = url
        if len(urls) == num_servers:
            listing = ", ".join(urls[rank] for rank in sorted(urls))
            print(f"pd-serve ready: {num_servers} API servers, one per DP rank: {listing}",
                  flush=True)  # fmt: skip


# ---- pd-serve multi-api-server ------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pd-serve multi-api-server",
        description="Start one API server per DP rank of one instance (FastDeploy's "
        "multi_api_server); the flags after --args go to every server.",
        allow_abbrev=False,
    )
    parser.add_argument("--num-servers", required=True, type=parse_size, metavar="N",
                        help="API servers: one per DP rank of this host")  # fmt: skip
    parser.add_argument("--ports", required=True, type=parse_port_list, metavar="P1,P2,...",
                        help="their API ports, one per server")  # fmt: skip
    parser.add_argument("--metrics-ports", type=parse_port_list, metavar="P1,P2,...",
                        help="their metrics ports (default: /metrics on each API "
                        "port)")  # fmt: skip
    parser.add_argument("--args", nargs=argparse.REMAINDER, default=[], metavar="FLAG",
                        help="pd-serve flags for every server (--model ... "
                        "--data-parallel-size N ...)")  # fmt: skip
    return parser


def multi_api_server_main(argv: list[str]) -> int:
    return run_api_servers(parse_multi_api_server(argv))


def parse_multi_api_server(argv: list[str]) -> ServeArgs:
    """The instance's flags: ``--args`` with the servers' ports; exit 2 on error."""
    parser = build_parser()
    options = parser.parse_args(argv)
    if len(options.ports) != options.num_servers:
        parser.error(f"--ports has {len(options.ports)} entries for --num-servers "
                     f"{options.num_servers}: one port per server")  # fmt: skip
    serve_argv = [*options.args, "--ports", ",".join(map(str, options.ports))]
    if options.metrics_ports is not None:
        serve_argv += ["--metrics-ports", ",".join(map(str, options.metrics_ports))]
    args = parse_args(serve_argv)
    local = args.dp_layout.local
    if local != options.num_servers:
        parser.error(f"--num-servers {options.num_servers} but this host runs {local} DP "
                     "rank(s) (--data-parallel-size, --data-parallel-size-local): one "
                     "server per DP rank")  # fmt: skip
    return args


if __name__ == "__main__":
    sys.exit(multi_api_server_main(sys.argv[1:]))
