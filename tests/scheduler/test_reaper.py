"""The reaper against a real redis-server: a dead rank's queued requests move to a
live rank in order, its taken requests fail to their owners with a clear error."""

from __future__ import annotations

import redis

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.keys import Keys
from scheduler.reaper import Reaper
from scheduler.records import parse
from scheduler.redis_link import RedisLink
from scheduler.redis_server import EmbeddedRedis
from scheduler.request_queue import RankInbox, enqueue


def request(request_id: str, prefill: str, decode: str) -> pb.DispatchedRequest:
    return pb.DispatchedRequest(
        request_id=request_id, owner="api0", prompt_token_ids=[1, 2],
        prefill_rank_id=prefill, decode_rank_id=decode, protocol="tcp",
    )  # fmt: skip


def errors(client: redis.Redis, owner: str = "api0") -> dict[str, str]:
    raw = client.lrange(Keys("t").results(owner), 0, -1)
    return {e.request_id: e.error for b in raw for e in parse(pb.ResultBatch, b).entries}


def test_queued_requests_of_a_dead_rank_move_to_a_live_one_in_order(
    config: SchedulerConfig, redis_server: EmbeddedRedis, register
) -> None:
    link, keys = RedisLink(config, "test"), Keys("t")
    register("p1", role="prefill")
    register("d1", role="decode")
    for i in range(5):
        enqueue(link, keys, request(f"q{i}", "p0", "d0" if i % 2 else "d1"))  # p0 never lived
    reaper = Reaper(config, "test")
    assert reaper.run_once()
    assert reaper.num_redispatched == 5 and reaper.num_failed == 0
    moved = RankInbox(config, "p1").take(10)
    assert [r.request_id for r in moved] == [f"q{i}" for i in range(5)]
    assert {r.prefill_rank_id for r in moved} == {"p1"}
    assert all(r.num_redispatches == 1 for r in moved)
    assert [r.decode_rank_id for r in moved] == ["d1", "d0", "d1", "d0", "d1"], (
        "a live decode choice is kept; d0 is not checked here, the prefill rank's Reserve is"
    )


def test_redispatch_from_a_dead_mixed_rank_lets_the_target_decode(
    config: SchedulerConfig, register
) -> None:
    link, keys = RedisLink(config, "test"), Keys("t")
    register("p1", role="prefill")
    enqueue(link, keys, request("q", "m0", "m0"))
    Reaper(config, "test").run_once()
    (moved,) = RankInbox(config, "p1").take(10)
    assert moved.decode_rank_id == "" and moved.protocol == "", "p1 picks a decode rank"


def test_taken_requests_of_a_dead_rank_fail_with_the_role_that_was_lost(
    config: SchedulerConfig, redis_server: EmbeddedRedis, register
) -> None:
    link, keys = RedisLink(config, "test"), Keys("t")
    client = redis.Redis(port=redis_server.port)
    register("p1", role="prefill")
    enqueue(link, keys, request("at-prefill", "p0", "d0"))
    RankInbox(config, "p0").take(10)
    RankInbox(config, "d0").adopt(request("at-decode", "p1", "d0"))
    reaper = Reaper(config, "test")
    reaper.run_once()
    assert errors(client) == {
        "at-prefill": "prefill instance p0 lost",
        "at-decode": "decode instance d0 lost",
    }
    assert reaper.num_failed == 2
    assert client.keys("t:proc:*") == [] and client.keys("t:req:*") == []
    reaper.run_once()
    assert len(client.lrange(keys.results("api0"), 0, -1)) == 2, "settled once"


def test_queued_requests_fail_when_no_live_rank_can_prefill(
    config: SchedulerConfig, redis_server: EmbeddedRedis, register
) -> None:
    link, keys = RedisLink(config, "test"), Keys("t")
    register("d1", role="decode")
    enqueue(link, keys, request("orphan", "p0", "d1"))
    Reaper(config, "test").run_once()
    assert errors(redis.Redis(port=redis_server.port)) == {
        "orphan": "prefill instance p0 lost and no live prefill or mixed rank can take it"
    }


def test_live_ranks_are_left_alone_and_one_reaper_acts_at_a_time(
    config: SchedulerConfig, redis_server: EmbeddedRedis, register
) -> None:
    link, keys = RedisLink(config, "test"), Keys("t")
    client = redis.Redis(port=redis_server.port)
    register("m0")
    enqueue(link, keys, request("queued", "m0", "m0"))
    enqueue(link, keys, request("taken", "m0", "m0"))
    RankInbox(config, "m0").take(1)
    assert Reaper(config, "a").run_once()
    assert client.llen(keys.queue("m0")) == 1 and client.llen(keys.processing("m0")) == 1
    client.set(keys.reaper_lock, "someone-else", px=10_000)
    assert not Reaper(config, "b").run_once()
    assert client.get(keys.reaper_lock) == b"someone-else", "a lock is released only by its owner"


def test_malformed_entries_of_a_dead_rank_are_dropped(
    config: SchedulerConfig, redis_server: EmbeddedRedis, register
) -> None:
    client = redis.Redis(port=redis_server.port)
    register("m1")
    client.lpush("t:req:{gone}", b"\xffjunk")
    client.lpush("t:proc:{gone}", b"\xffjunk")
    Reaper(config, "test").run_once()
    assert client.keys("t:req:*") == [] and client.keys("t:proc:*") == []
