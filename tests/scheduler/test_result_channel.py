"""Result channels against a real redis-server: per-request order under concurrency
with the first token and the rest written by different ranks, discards, errors."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

import redis

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.keys import Keys
from scheduler.redis_link import RedisLink
from scheduler.redis_server import EmbeddedRedis
from scheduler.result_channel import ResultReader, ResultWriter

NUM_REQUESTS = 64
NUM_TOKENS = 40


class Collector:
    def __init__(self) -> None:
        self.entries: dict[str, list[pb.ResultEntry]] = defaultdict(list)
        self.finished = threading.Event()
        self.num_finished = 0
        self.expected_finishes = 0

    def __call__(self, request_id: str, entries: list[pb.ResultEntry]) -> None:
        self.entries[request_id] += entries
        if entries[-1].finish_reason:
            self.num_finished += 1
            if self.num_finished == self.expected_finishes:
                self.finished.set()


def write_steps(config: SchedulerConfig, rank_id: str, steps: list[list[pb.ResultEntry]]) -> None:
    """One rank: each step's entries in one batch, a random short pause between steps."""
    link, writer, rng = RedisLink(config, rank_id), ResultWriter(config, rank_id), random.Random()
    for step in steps:
        for entry in step:
            writer.add("api0", entry)
        pipe = link.client.pipeline(transaction=False)
        writer.flush_into(pipe)
        pipe.execute()
        writer.sent()
        time.sleep(rng.random() * 0.002)


def token(request: int, index: int) -> int:
    return request * 1000 + index


def test_tokens_arrive_in_order_per_request_under_64_concurrent_requests(
    config: SchedulerConfig,
) -> None:
    collector = Collector()
    collector.expected_finishes = NUM_REQUESTS
    reader = ResultReader(config, "api0", collector).start()
    for r in range(NUM_REQUESTS):
        reader.expect(f"req{r}")
    # "prefill" writes each request's first token; two "decode" ranks write the rest,
    # several tokens per step, racing the prefill writes.
    prefill_steps = [
        [pb.ResultEntry(request_id=f"req{r}", index=0, token_ids=[token(r, 0)])]
        for r in range(NUM_REQUESTS)
    ]
    decode_steps: list[list[list[pb.ResultEntry]]] = [[], []]
    for index in range(1, NUM_TOKENS, 3):
        for owner in range(2):
            step = []
            for r in range(owner, NUM_REQUESTS, 2):
                ids = [token(r, i) for i in range(index, min(index + 3, NUM_TOKENS))]
                done = index + 3 >= NUM_TOKENS
                step.append(pb.ResultEntry(
                    request_id=f"req{r}", index=index, token_ids=ids,
                    finish_reason="length" if done else "",
                ))  # fmt: skip
            decode_steps[owner].append(step)
    writers = [
        threading.Thread(target=write_steps, args=(config, "p0", prefill_steps)),
        threading.Thread(target=write_steps, args=(config, "d0", decode_steps[0])),
        threading.Thread(target=write_steps, args=(config, "d1", decode_steps[1])),
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert collector.finished.wait(10), f"{collector.num_finished} of {NUM_REQUESTS} finished"
    reader.stop()
    for r in range(NUM_REQUESTS):
        entries = collector.entries[f"req{r}"]
        tokens = [t for e in entries for t in e.token_ids]
        assert tokens == [token(r, i) for i in range(NUM_TOKENS)], f"req{r} out of order"
        assert [e.finish_reason for e in entries][-1] == "length"
        assert not any(e.finish_reason for e in entries[:-1])
        assert entries[0].rank_id == "p0" and entries[-1].rank_id in ("d0", "d1")
    assert reader.num_expected == 0


def test_entries_of_finished_aborted_and_unknown_requests_are_discarded(
    config: SchedulerConfig, redis_server: EmbeddedRedis
) -> None:
    collector = Collector()
    collector.expected_finishes = 2
    reader = ResultReader(config, "api0", collector).start()
    for request_id in ("done", "aborted", "failed"):
        reader.expect(request_id)
    reader.forget("aborted")
    steps = [[
        pb.ResultEntry(request_id="done", index=0, token_ids=[1], finish_reason="stop"),
        pb.ResultEntry(request_id="aborted", index=0, token_ids=[2]),
        pb.ResultEntry(request_id="stranger", index=0, token_ids=[3]),
        pb.ResultEntry(request_id="failed", index=4, token_ids=[9]),  # early, then the error
        pb.ResultEntry(request_id="failed", finish_reason="error", error="decode instance d7 lost"),
    ], [
        pb.ResultEntry(request_id="done", index=1, token_ids=[4]),  # after its finish
        pb.ResultEntry(request_id="failed", index=0, token_ids=[5]),  # after its error
    ]]  # fmt: skip
    redis.Redis(port=redis_server.port).rpush(Keys("t").results("api0"), b"\xffgarbage")
    write_steps(config, "r0", steps)
    assert collector.finished.wait(5)
    time.sleep(0.2)
    reader.stop()
    assert [list(e.token_ids) for e in collector.entries["done"]] == [[1]]
    (error,) = collector.entries["failed"]
    assert error.finish_reason == "error" and error.error == "decode instance d7 lost"
    assert set(collector.entries) == {"done", "failed"}
    assert reader.num_discarded == 4 and reader.num_malformed == 1
