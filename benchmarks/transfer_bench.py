"""KV-transfer bandwidth per backend next to a raw copy of the same bytes.

    python benchmarks/transfer_bench.py              # CPU: ipc (shared memory) and tcp
    python benchmarks/transfer_bench.py --gpu        # + CUDA IPC GPU0 -> GPU1 (2 GPUs)

Each row moves a request's blocks (all layers, K and V) from a sender pool into a
receiver pool owned by another process. "contiguous" blocks coalesce into one region
per layer and K|V; "scattered" blocks are every other block, so nothing coalesces;
"by layer" sends the scattered blocks as one write per layer, as prefill ranks do.
Each row is timed twice: "one" moves one request's blocks and waits for them (the
latency-bound rate a lone request sees); "x8" queues eight such transfers back to back
and waits for all (the rate a decode pool sees under load, where one transfer's fixed
costs overlap another's copying). References, measured in the same run the same two
ways: for ipc on CPU a memcpy of the same byte count; for tcp a raw socket stream of the
same byte count between the same processes; for CUDA IPC a plain peer copy GPU0 -> GPU1
of the same bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from cache_transfer.endpoints import endpoint_from_proto, endpoint_to_proto
from cache_transfer.ipc import IpcTransferEngine, allocate_shared_pool
from cache_transfer.regions import all_regions, block_runs, layer_regions
from cache_transfer.tcp import TcpTransferEngine
from cache_transfer.transfer_engine import wait_all
from engine.kv_cache import KVCacheLayout


def make_layout(num_blocks: int, block_size: int, num_layers: int) -> KVCacheLayout:
    return KVCacheLayout(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                         num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)  # fmt: skip


def receiver_main(conn, protocol: str, shape: tuple, device: str) -> None:  # type: ignore[no-untyped-def]
    """Child process: owns the receiving pool (and a raw socket sink for the reference)."""
    num_layers, num_blocks, block_size = shape
    layout = make_layout(num_blocks, block_size, num_layers)
    if protocol == "ipc" and device == "cpu":
        pool, path = allocate_shared_pool(layout)
        engine = IpcTransferEngine(pool, layout, shm_path=path)
    elif protocol == "ipc":
        pool = torch.zeros(layout.shape, dtype=layout.dtype, device=device)
        engine = IpcTransferEngine(pool, layout)
    else:
        pool = torch.zeros(layout.shape, dtype=layout.dtype)
        engine = TcpTransferEngine(pool, layout)
    engine.allow(1, [(0, layout.total_bytes)])
    sink = socket.create_server(("127.0.0.1", 0))
    conn.send((endpoint_to_proto(engine.endpoint()).SerializeToString(), sink.getsockname()[1]))

    def drain_raw_streams() -> None:  # one raw stream per reference measurement
        buffer = memoryview(bytearray(8 << 20))
        while True:
            raw, _ = sink.accept()
            while raw.recv_into(buffer) > 0:
                pass
            raw.sendall(b"k")
            raw.close()

    threading.Thread(target=drain_raw_streams, daemon=True).start()
    conn.recv()  # "done"
    engine.close()


BACK_TO_BACK = 8


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def raw_stream(port: int, payload: memoryview) -> None:
    """One plain socket stream of ``payload``, until the receiver has read it all."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)


def bench(protocol: str, device: str, num_blocks: int, block_size: int, num_layers: int,
          repeats: int) -> list[tuple]:  # fmt: skip
    from proto import pd_comm_pb2 as pb

    layout = make_layout(num_blocks * 2, block_size, num_layers)
    src_device = "cuda:0" if device != "cpu" else "cpu"
    src = torch.randn(layout.shape, device=src_device, dtype=layout.dtype)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child, protocol, (num_layers, num_blocks * 2,
                       block_size), device))  # fmt: skip
    proc.start()
    endpoint_bytes, sink_port = parent.recv()
    endpoint = endpoint_from_proto(pb.Endpoint.FromString(endpoint_bytes))
    engine = (IpcTransferEngine(src, layout) if protocol == "ipc"
              else TcpTransferEngine(src, layout, listen=False))  # fmt: skip
    engine.connect("peer", endpoint)
    rows = []
    contiguous, scattered = list(range(num_blocks)), list(range(0, 2 * num_blocks, 2))
    for pattern, blocks in (("contiguous", contiguous), ("scattered", scattered),
                            ("by layer", scattered)):  # fmt: skip
        if pattern == "by layer":  # one write per layer, as prefill sends them
            runs = block_runs(blocks, blocks)
            writes = [layer_regions(layout, layout, runs, i) for i in range(num_layers)]
        else:
            writes = [all_regions(layout, layout, blocks, blocks)]
        nbytes = sum(w.total_bytes for w in writes)

        def transfer(writes=writes, times: int = 1) -> None:  # type: ignore[no-untyped-def]
            handles = [engine.write("peer", 1, w) for _ in range(times) for w in writes]
            wait_all(handles, timeout_s=120)

        one = nbytes / timed(transfer, repeats)
        several = BACK_TO_BACK * nbytes / timed(lambda: transfer(times=BACK_TO_BACK), repeats)
        rows.append((protocol, device, pattern, num_blocks, block_size, nbytes, one, several))
    nbytes = rows[0][5]
    if protocol == "tcp":  # a raw stream is already back to back
        payload = memoryview(src.view(torch.uint8).reshape(-1).numpy())[:nbytes]
        rate = nbytes / timed(lambda: raw_stream(sink_port, payload), repeats)
        reference = ("raw socket stream", rate, rate)
    elif device == "cpu":
        a = torch.empty(nbytes, dtype=torch.uint8)
        b = src.view(torch.uint8).reshape(-1)[:nbytes]
        rate = nbytes / timed(lambda: a.copy_(b), repeats)
        reference = ("memcpy", rate, rate)
    else:
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
        flat = src.view(torch.uint8).reshape(-1)[:nbytes]

        def peer_copy(times: int = 1) -> None:
            for _ in range(times):
                dst.copy_(flat, non_blocking=True)
            torch.cuda.synchronize("cuda:0")
            torch.cuda.synchronize("cuda:1")

        several = BACK_TO_BACK * nbytes / timed(lambda: peer_copy(BACK_TO_BACK), repeats)
        reference = ("peer copy GPU0->GPU1", nbytes / timed(peer_copy, repeats), several)
    engine.close()
    parent.send("done")
    proc.join(timeout=30)
    return [row + reference for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="also CUDA IPC GPU0 -> GPU1")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-protocols", nargs="*", default=["ipc", "tcp"],
                        choices=["ipc", "tcp"], help="CPU backends (none: skip)")  # fmt: skip
    args = parser.parse_args()
    cases = [(p, "cpu", n, bs) for p in args.cpu_protocols for n in (16, 256) for bs in (16, 64)]
    if args.gpu:
        cases += [("ipc", "cuda:1", n, bs) for n in (16, 256, 1024) for bs in (16, 64)]
    rows = [row for case in cases for row in bench(*case, args.layers, args.repeats)]
    header = (f"{'backend':<8}{'to':<8}{'blocks':<12}{'n':>6}{'tok/blk':>8}{'MiB':>9}"
              f"  {'reference':<22}{'one: GB/s':>10}{'ref':>8}{'ratio':>7}"
              f"{'x8: GB/s':>10}{'ref':>8}{'ratio':>7}")  # fmt: skip
    print(f"\nKV transfer, {args.layers} layers x K,V, 8 KV heads x 128 dims, bf16\n")
    print(header)
    print("-" * len(header))
    for protocol, device, pattern, n, bs, nbytes, one, x8, ref_name, ref_one, ref_x8 in rows:
        print(f"{protocol:<8}{device:<8}{pattern:<12}{n:>6}{bs:>8}{nbytes / 2**20:>9.1f}"
              f"  {ref_name:<22}{one / 1e9:>10.2f}{ref_one / 1e9:>8.2f}{one / ref_one:>7.0%}"
              f"{x8 / 1e9:>10.2f}{ref_x8 / 1e9:>8.2f}{x8 / ref_x8:>7.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
