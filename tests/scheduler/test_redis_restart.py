"""A Redis restart loses every list: ranks restore the requests they had taken, the
API server re-queues what no rank had taken and fails what cannot be recovered."""

from __future__ import annotations

import threading
import time

import redis

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.keys import Keys
from scheduler.redis_server import EmbeddedRedis
from scheduler.splitwise import SplitwiseFrontend, SplitwiseRank
from tests.scheduler.conftest import EXPIRE_PERIOD_MS, make_record

PERIOD_S = EXPIRE_PERIOD_MS / 1000


def restart(server: EmbeddedRedis) -> None:
    server.kill()
    time.sleep(PERIOD_S / 2)
    server.start()


def test_requests_survive_a_redis_restart(
    config: SchedulerConfig, redis_server: EmbeddedRedis
) -> None:
    client, keys = redis.Redis(port=redis_server.port), Keys(config.topic)
    rank = SplitwiseRank(config, make_record("m0")).start()
    seen: dict[str, list[pb.ResultEntry]] = {}
    finished = threading.Event()

    def sink(request_id: str, entries: list[pb.ResultEntry]) -> None:
        seen.setdefault(request_id, []).extend(entries)
        if request_id == "started" and entries[-1].finish_reason:
            finished.set()

    frontend = SplitwiseFrontend(config, "api0", sink)
    try:
        for request_id in ("taken", "started", "queued-1", "queued-2"):
            frontend.submit(pb.DispatchedRequest(request_id=request_id, prompt_token_ids=[1]))
        assert [r.request_id for r in rank.take(2)] == ["taken", "started"]
        rank.add_result("api0", pb.ResultEntry(request_id="started", index=0, token_ids=[5]))
        rank.end_step([])
        deadline = time.monotonic() + 5
        while "started" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)

        restart(redis_server)
        time.sleep(3 * PERIOD_S)  # ranks re-register and restore; the frontend settles

        assert client.llen(keys.processing("m0")) == 2, "the rank restored what it had taken"
        assert {r.request_id for r in rank.take(10)} == {"queued-1", "queued-2"}, "re-queued"
        assert "taken" not in seen and "queued-1" not in seen
        rank.add_result("api0", pb.ResultEntry(
            request_id="started", index=1, token_ids=[6], finish_reason="stop"
        ))  # fmt: skip
        rank.end_step(["started"])
        assert finished.wait(5), "results flow again after the restart"
        assert [t for e in seen["started"] for t in e.token_ids] == [5, 6]
    finally:
        frontend.close()
        rank.close()


def test_a_started_request_no_rank_holds_fails_after_a_restart(
    config: SchedulerConfig, redis_server: EmbeddedRedis
) -> None:
    rank = SplitwiseRank(config, make_record("m0")).start()
    seen: dict[str, list[pb.ResultEntry]] = {}
    frontend = SplitwiseFrontend(
        config, "api0", lambda rid, entries: seen.setdefault(rid, []).extend(entries)
    )
    try:
        frontend.submit(pb.DispatchedRequest(request_id="orphan", prompt_token_ids=[1]))
        rank.take(1)
        rank.add_result("api0", pb.ResultEntry(request_id="orphan", index=0, token_ids=[5]))
        rank.end_step([])
        time.sleep(0.3)
        rank.inbox._entries.clear()  # as if the rank had lost it too
        restart(redis_server)
        time.sleep(3 * PERIOD_S)
        errors = [e.error for e in seen["orphan"] if e.finish_reason == "error"]
        assert errors == ["request orphan was lost when the scheduler's Redis restarted"]
        assert frontend.num_in_flight == 0
    finally:
        frontend.close()
        rank.close()
