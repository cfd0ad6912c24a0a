"""A rank process is killed while it works through 1,000 queued requests: every request
ends exactly one way — processed once by the dead rank before it died, re-dispatched and
processed once by the survivor, or failed to its owner with a clear error."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import redis

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.keys import Keys
from scheduler.reaper import Reaper
from scheduler.records import parse
from scheduler.redis_link import RedisLink
from scheduler.redis_server import EmbeddedRedis
from scheduler.request_queue import enqueue
from tests.scheduler.conftest import EXPIRE_PERIOD_MS

RANK_WORKER = Path(__file__).with_name("rank_worker.py")
NUM_REQUESTS = 1000


def start_rank(port: int, rank_id: str) -> subprocess.Popen:
    worker = subprocess.Popen(
        [sys.executable, str(RANK_WORKER), "--port", str(port), "--rank-id", rank_id,
         "--expire-ms", str(EXPIRE_PERIOD_MS), "--work-ms", "2"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert worker.stdout.readline().strip() == "ready"
    return worker


def drain(client: redis.Redis, key: str, outcomes: dict[str, list[tuple[str, str]]]) -> int:
    """Append (rank or 'error', message) per entry in the channel; returns how many."""
    raw = client.lrange(key, 0, -1)
    client.ltrim(key, len(raw), -1)
    for batch in raw:
        for entry in parse(pb.ResultBatch, batch).entries:
            who = "error" if entry.finish_reason == "error" else entry.rank_id
            outcomes[entry.request_id].append((who, entry.error))
    return len(raw)


def test_killed_rank_loses_and_duplicates_nothing(
    config: SchedulerConfig, redis_server: EmbeddedRedis
) -> None:
    client = redis.Redis(port=redis_server.port)
    link, keys = RedisLink(config, "test"), Keys(config.topic)
    doomed = start_rank(redis_server.port, "doomed")
    survivor = start_rank(redis_server.port, "survivor")
    reaper = Reaper(config, "api0").start()
    outcomes: dict[str, list[tuple[str, str]]] = defaultdict(list)
    try:
        for i in range(NUM_REQUESTS):
            enqueue(link, keys, pb.DispatchedRequest(
                request_id=f"req{i}", owner="api0", prompt_token_ids=[1],
                prefill_rank_id="doomed", decode_rank_id="doomed",
            ))  # fmt: skip
        while len(outcomes) < 300:
            drain(client, keys.results("api0"), outcomes)
            time.sleep(0.005)
        doomed.kill()
        doomed.wait()
        killed_at = time.monotonic()
        failed_after = None
        while sum(len(v) for v in outcomes.values()) < NUM_REQUESTS:
            drain(client, keys.results("api0"), outcomes)
            if failed_after is None and any(w == "error" for v in outcomes.values() for w, _ in v):
                failed_after = time.monotonic() - killed_at
            if time.monotonic() - killed_at > 30:
                pytest.fail(f"only {len(outcomes)} of {NUM_REQUESTS} requests were settled")
            time.sleep(0.01)
        time.sleep(2 * EXPIRE_PERIOD_MS / 1000)  # anything late would show up now
        drain(client, keys.results("api0"), outcomes)
    finally:
        reaper.stop()
        doomed.kill()
        survivor.kill()
    kinds = Counter()
    for request_id, ends in outcomes.items():
        processed = [who for who, _ in ends if who != "error"]
        assert len(processed) <= 1, f"{request_id} processed twice: {ends}"
        if processed:
            kinds[processed[0]] += 1
        else:
            (error,) = {message for _, message in ends}
            assert error == "prefill instance doomed lost", error
            kinds["failed"] += 1
    assert len(outcomes) == NUM_REQUESTS, "every request ended somehow"
    assert sum(kinds.values()) == NUM_REQUESTS
    assert kinds["doomed"] >= 300 and kinds["survivor"] > 0, kinds
    assert kinds["failed"] <= 8, f"at most the dead rank's capacity was in flight: {kinds}"
    if kinds["failed"]:
        assert failed_after <= EXPIRE_PERIOD_MS / 1000 + 2, failed_after
    assert client.keys("t:req:*") == [] and client.keys("t:proc:*") == []
