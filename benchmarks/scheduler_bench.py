"""Cost of the splitwise scheduler's request path on a real redis-server.

    python benchmarks/scheduler_bench.py [--ranks 64] [--requests 5000] [--threads 8]

Registers ``--ranks`` ranks (heartbeats running, as in a cluster), then measures
``SplitwiseFrontend.submit`` (cached registry snapshot + dispatch policy + enqueue)
one request at a time and from ``--threads`` threads, and a rank's per-request cost
(take + results + release). References measured in the same run: one bare LPUSH
round trip (what any Redis-backed dispatch must pay) and the dispatch policy alone.
Round trips are counted on the client (a pipeline or a script counts one).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
from redis.connection import Connection

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.dispatch_policy import dispatch
from scheduler.redis_server import EmbeddedRedis
from scheduler.registry import RankRegistration
from scheduler.splitwise import SplitwiseFrontend, SplitwiseRank

PROMPT = list(range(512))


class RoundTrips:
    """Counts packed sends (one per command, pipeline or script) from marked threads."""

    def __init__(self) -> None:
        self.counting = threading.local()
        self.count = 0
        self._lock = threading.Lock()
        original = Connection.send_packed_command

        def counted(conn, command, check_health=True):  # type: ignore[no-untyped-def]
            if getattr(self.counting, "on", False):
                with self._lock:
                    self.count += 1
            return original(conn, command, check_health)

        Connection.send_packed_command = counted

    def mark(self) -> None:
        self.counting.on = True


def make_record(i: int) -> pb.InstanceRecord:
    role = ("prefill", "decode")[i % 2]
    return pb.InstanceRecord(
        rank_id=f"rank{i}", role=role, host=f"host{i // 8}", protocols=["rdma", "tcp"],
        kv_layout=pb.KvLayout(block_size=64, num_blocks=4096),
    )  # fmt: skip


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_s)
    return ordered[len(ordered) // 2] * 1e6, ordered[int(len(ordered) * 0.99)] * 1e6


def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    samples = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    trips = RoundTrips()
    rows: list[tuple[str, float, float, float, float | None]] = []

    with EmbeddedRedis() as server:
        config = SchedulerConfig(name="splitwise", port=server.port, topic="bench")
        ranks = [RankRegistration(config, make_record(i)).start() for i in range(args.ranks)]
        rng = random.Random(0)
        for rank in ranks:
            rank.update_load(
                num_running=rng.randrange(64), num_waiting=rng.randrange(8),
                num_queued_prompt_tokens=rng.randrange(20_000), num_free_blocks=rng.randrange(4096),
            )  # fmt: skip
        time.sleep(config.heartbeat_interval_s * 2)

        client = redis.Redis(port=server.port)
        payload = b"x" * len(pb.DispatchedRequest(prompt_token_ids=PROMPT).SerializeToString())
        raw = timed(lambda i: client.lpush("bench:raw", payload), args.requests)
        rows.append(("LPUSH round trip (reference)", *percentiles(raw), len(raw) / sum(raw), 1.0))

        frontend = SplitwiseFrontend(config, "api0", lambda *_: None, run_reaper=False)
        snapshot = frontend.registry.snapshot()
        policy = timed(lambda i: dispatch(snapshot, len(PROMPT), rng), args.requests)
        rows.append((f"dispatch policy, {args.ranks} ranks", *percentiles(policy),
                     len(policy) / sum(policy), 0.0))  # fmt: skip

        def submit(i: int) -> None:
            frontend.submit(pb.DispatchedRequest(request_id=f"s{i}", prompt_token_ids=PROMPT))

        trips.mark()
        before = trips.count
        single = timed(submit, args.requests)
        per_request = (trips.count - before) / args.requests
        rows.append(("submit, 1 thread", *percentiles(single), len(single) / sum(single),
                     per_request))  # fmt: skip

        def burst(t: int) -> list[float]:
            trips.mark()
            n = args.requests // args.threads
            return timed(lambda i: submit(args.requests * (t + 1) + i), n)

        before = trips.count
        start = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            many = [s for samples in pool.map(burst, range(args.threads)) for s in samples]
        elapsed = time.perf_counter() - start
        rows.append((f"submit, {args.threads} threads", *percentiles(many), len(many) / elapsed,
                     (trips.count - before) / len(many)))  # fmt: skip

        # A rank's side: take what is queued, answer each request, release it.
        rank = SplitwiseRank(config, make_record(0), run_reaper=False)
        queued = client.llen("bench:req:{rank0}")
        rank_samples: list[float] = []
        before = trips.count
        while True:
            start = time.perf_counter()
            taken = rank.take(32)
            if not taken:
                break
            for request in taken:
                rank.add_result(request.owner, pb.ResultEntry(request_id=request.request_id,
                                token_ids=[1], finish_reason="stop"))  # fmt: skip
            rank.end_step([r.request_id for r in taken])
            rank_samples.append((time.perf_counter() - start) / len(taken))
        rate = 1 / statistics.mean(rank_samples)
        rtt = (trips.count - before) / max(queued, 1)
        rows.append(("rank take+result+release", *percentiles(rank_samples), rate, rtt))

        frontend.close()
        rank.close()
        for registration in ranks:
            registration.stop()

    print(f"\nsplitwise scheduler, {args.ranks} registered ranks, {args.requests} requests, "
          f"{len(PROMPT)}-token prompts, redis-server on localhost\n")  # fmt: skip
    header = f"{'measurement':<32}{'p50 us':>10}{'p99 us':>10}{'per s':>11}{'RTT/req':>9}"
    print(header)
    print("-" * len(header))
    for name, p50, p99, rate, rtt in rows:
        print(f"{name:<32}{p50:>10.1f}{p99:>10.1f}{rate:>11.0f}{rtt:>9.2f}")


if __name__ == "__main__":
    main()
