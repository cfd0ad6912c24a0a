"""The cost of lockstep DP's per-step question, "is any DP rank busy?": one int32
all-reduce over the DP group (gloo on the CPU, as the engine runs it), between N
processes on this machine, next to a bare TCP round trip between two of them.

    python benchmarks/lockstep_bench.py --ranks 2 --iterations 2000

Prints microseconds per check (median and p99 over the iterations, rank 0's view).
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_ranks(target, num_ranks: int, arg, timeout_s: float):  # type: ignore[no-untyped-def]
    """Run ``target(rank, num_ranks, port, arg, results)`` in one spawned process per
    rank (a group on a free local port); what rank 0 puts in ``results``."""
    from pd.args import pick_free_port

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = pick_free_port()
    processes = [
        context.Process(target=target, args=(rank, num_ranks, port, arg, results))
        for rank in range(num_ranks)
    ]
    for process in processes:
        process.start()
    result = results.get(timeout=timeout_s)
    for process in processes:
        process.join()
    return result


def rank_main(rank: int, size: int, port: int, iterations: int, results) -> None:  # type: ignore[no-untyped-def]
    import torch
    import torch.distributed as dist

    from engine.data_parallel import DataParallelGroup
    from engine.distributed import JOIN_TIMEOUT, GroupAddress, join_group

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=JOIN_TIMEOUT)
    group = join_group(GroupAddress("127.0.0.1", port, size), rank, torch.device("cpu"), store)
    dp = DataParallelGroup(group, store)
    times = []
    for i in range(iterations):
        started = time.perf_counter()
        dp.any_busy(i % 7 == rank)
        times.append(time.perf_counter() - started)
    if rank == 0:
        results.put(times[iterations // 10 :])  # after warm-up


def tcp_round_trip(iterations: int) -> list[float]:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(4):
                conn.sendall(data)

    process = multiprocessing.get_context("fork").Process(target=echo)
    process.start()
    times = []
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(iterations):
            started = time.perf_counter()
            client.sendall(b"busy")
            client.recv(4)
            times.append(time.perf_counter() - started)
    process.join()
    return times[iterations // 10 :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    check = run_ranks(rank_main, args.ranks, args.iterations, timeout_s=300)
    bare = tcp_round_trip(args.iterations)
    print("| measure | median us | p99 us |\n|---|---:|---:|")
    for name, times in ((f"any_busy over {args.ranks} ranks (gloo)", check),
                        ("bare TCP round trip", bare)):  # fmt: skip
        times = sorted(times)
        p99 = times[int(0.99 * (len(times) - 1))]
        print(f"| {name} | {statistics.median(times) * 1e6:.0f} | {p99 * 1e6:.0f} |")


if __name__ == "__main__":
    main()
