"""The registry against a real redis-server: registration with load, expiry of a
killed rank, re-registration after a Redis restart, malformed records."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.records import encode
from scheduler.redis_server import EmbeddedRedis
from scheduler.registry import RankRegistration, RegistryReader
from tests.scheduler.conftest import EXPIRE_PERIOD_MS

RANK_WORKER = Path(__file__).with_name("rank_worker.py")
PERIOD_S = EXPIRE_PERIOD_MS / 1000


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.01) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(step_s)
    return time.monotonic() - start


def live_ids(reader: RegistryReader) -> set[str]:
    return {rank.rank_id for rank in reader.snapshot(max_age_s=0)}


def test_ranks_register_with_their_load(config: SchedulerConfig, record) -> None:
    ranks = [RankRegistration(config, record(f"r{i}")).start() for i in range(4)]
    reader = RegistryReader(config)
    try:
        assert live_ids(reader) == {"r0", "r1", "r2", "r3"}
        for i, rank in enumerate(ranks):
            rank.update_load(
                num_running=i, num_waiting=2 * i, num_queued_prompt_tokens=100 * i,
                num_free_blocks=1000 - i,
            )  # fmt: skip

        def loads_arrived() -> bool:
            return all(r.num_queued_prompt_tokens == 100 * int(r.rank_id[1:])
                       for r in reader.snapshot(max_age_s=0))  # fmt: skip

        wait_until(loads_arrived, 2 * PERIOD_S)
        by_id = {r.rank_id: r for r in reader.snapshot()}
        assert (by_id["r3"].num_running, by_id["r3"].num_waiting) == (3, 6)
        assert by_id["r3"].num_free_blocks == 997 and by_id["r3"].num_blocks == 1000
        assert reader.record("r2").kv_layout.block_size == 16
    finally:
        for rank in ranks:
            rank.stop()
        reader.close()
    assert live_ids(RegistryReader(config)) == set(), "stop() deregisters"


def test_snapshot_is_cached_between_refreshes(config: SchedulerConfig, record) -> None:
    rank = RankRegistration(config, record("r0")).start()
    reader = RegistryReader(config, max_age_s=60)
    try:
        for _ in range(100):
            assert [r.rank_id for r in reader.snapshot()] == ["r0"]
        assert reader.num_refreshes == 1
    finally:
        rank.stop()
        reader.close()


def test_killed_rank_disappears_after_the_expire_period(
    config: SchedulerConfig, redis_server: EmbeddedRedis
) -> None:
    worker = subprocess.Popen(
        [sys.executable, str(RANK_WORKER), "--port", str(redis_server.port), "--rank-id", "doomed",
         "--expire-ms", str(EXPIRE_PERIOD_MS)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    reader = RegistryReader(config)
    try:
        assert worker.stdout.readline().strip() == "ready"
        assert "doomed" in live_ids(reader)
        time.sleep(2 * PERIOD_S)
        assert "doomed" in live_ids(reader), "heartbeats keep a live rank registered"
        worker.kill()
        worker.wait()
        gone_after = wait_until(lambda: "doomed" not in live_ids(reader), PERIOD_S + 1.0)
        assert gone_after <= PERIOD_S + 0.2
    finally:
        worker.kill()
        worker.wait()
        reader.close()


def test_ranks_reregister_after_a_redis_restart(
    config: SchedulerConfig, redis_server: EmbeddedRedis, record
) -> None:
    ranks = [RankRegistration(config, record(f"r{i}")).start() for i in range(3)]
    reader = RegistryReader(config)
    try:
        assert live_ids(reader) == {"r0", "r1", "r2"}
        redis_server.kill()
        time.sleep(PERIOD_S)  # ranks fail to write meanwhile, quietly
        redis_server.start()
        assert live_ids(reader) == set(), "a restarted Redis starts empty"
        back_after = wait_until(lambda: live_ids(reader) == {"r0", "r1", "r2"}, 2 * PERIOD_S)
        assert back_after < 2 * PERIOD_S
    finally:
        for rank in ranks:
            rank.stop()
        reader.close()


def test_redis_outage_is_logged_once_per_process(
    config: SchedulerConfig, redis_server: EmbeddedRedis, record, caplog
) -> None:
    ranks = [RankRegistration(config, record(f"r{i}")).start() for i in range(3)]
    try:
        with caplog.at_level(logging.WARNING, logger="scheduler.redis_link"):
            redis_server.kill()
            time.sleep(3 * PERIOD_S)
            redis_server.start()
            time.sleep(PERIOD_S)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("unavailable" in m for m in messages) == 1, messages
        assert sum("is back after" in m for m in messages) == 1, messages
    finally:
        for rank in ranks:
            rank.stop()


def test_malformed_records_are_skipped_with_a_warning(
    config: SchedulerConfig, redis_server: EmbeddedRedis, record, caplog
) -> None:
    rank = RankRegistration(config, record("good")).start()
    client = redis.Redis(port=redis_server.port)
    future = record("future")
    future_bytes = encode(future)
    future.schema_version = 99
    client.set("t:inst:mixed:garbage", b"\xff\x00not a protobuf\x13")
    client.set("t:inst:mixed:future", future.SerializeToString())
    client.set("t:inst:mixed:empty", pb.InstanceRecord(schema_version=1).SerializeToString())
    reader = RegistryReader(config)
    try:
        with caplog.at_level(logging.WARNING, logger="scheduler.registry"):
            assert live_ids(reader) == {"good"}
            assert live_ids(reader) == {"good"}
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 3, "one warning per bad key, not one per read"
        assert any("schema version 99" in w for w in warnings)
        client.set("t:inst:mixed:future", future_bytes)  # fixed: read again
        assert live_ids(reader) == {"good", "future"}
    finally:
        rank.stop()
        reader.close()
