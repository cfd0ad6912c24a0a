"""Reliable queues against a real redis-server: take moves, finish releases, the
scheduler TTL, aborts in every race, malformed entries."""

from __future__ import annotations

import logging
import threading
import time

import redis

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.keys import Keys
from scheduler.records import encode, parse
from scheduler.redis_link import RedisLink
from scheduler.redis_server import EmbeddedRedis
from scheduler.request_queue import RankInbox, enqueue, send_abort, withdraw


def request(request_id: str, rank_id: str = "r0", owner: str = "api0") -> pb.DispatchedRequest:
    return pb.DispatchedRequest(
        request_id=request_id, owner=owner, prompt_token_ids=[1, 2, 3], prefill_rank_id=rank_id,
        decode_rank_id=rank_id,
    )  # fmt: skip


def lengths(client: redis.Redis, keys: Keys, rank_id: str = "r0") -> tuple[int, int]:
    return client.llen(keys.queue(rank_id)), client.llen(keys.processing(rank_id))


def test_take_moves_oldest_first_and_finish_releases(
    config: SchedulerConfig, redis_server: EmbeddedRedis
) -> None:
    link, keys = RedisLink(config, "test"), Keys(config.topic)
    client = redis.Redis(port=redis_server.port)
    for i in range(5):
        enqueue(link, keys, request(f"q{i}"))
    inbox = RankInbox(config, "r0")
    taken = inbox.take(3)
    assert [r.request_id for r in taken] == ["q0", "q1", "q2"]
    assert lengths(client, keys) == (2, 3), "taken entries stay in Redis until finished"
    assert [r.request_id for r in inbox.take(10, block_s=0.1)] == ["q3", "q4"]
    assert inbox.take(10, block_s=0.05) == []
    assert inbox.take(0) == []
    inbox.finish(["q1", "q3"])
    pipe = client.pipeline()
    inbox.release_into(pipe)
    pipe.execute()
    inbox.released()
    assert lengths(client, keys) == (0, 3)
    assert inbox.num_taken == 3


def test_blocking_take_wakes_on_enqueue(config: SchedulerConfig) -> None:
    link, keys = RedisLink(config, "test"), Keys(config.topic)
    inbox = RankInbox(config, "r0")
    threading.Timer(0.1, lambda: enqueue(link, keys, request("late"))).start()
    start = time.monotonic()
    taken = inbox.take(4, block_s=2.0)
    assert [r.request_id for r in taken] == ["late"]
    assert time.monotonic() - start < 1.0


def test_requests_queued_longer_than_the_ttl_fail_to_their_owner(
    redis_server: EmbeddedRedis,
) -> None:
    config = SchedulerConfig(name="splitwise", port=redis_server.port, topic="t", ttl_s=1)
    link, keys = RedisLink(config, "test"), Keys(config.topic)
    client = redis.Redis(port=redis_server.port)
    stale = request("stale")
    stale.enqueued_at_ms = int(time.time() * 1000) - 5000
    enqueue(link, keys, stale)
    enqueue(link, keys, request("fresh"))
    inbox = RankInbox(config, "r0")
    assert [r.request_id for r in inbox.take(10)] == ["fresh"]
    assert inbox.num_expired == 1
    (raw,) = client.lrange(keys.results("api0"), 0, -1)
    (entry,) = parse(pb.ResultBatch, raw).entries
    assert entry.request_id == "stale" and entry.finish_reason == "error"
    assert "longer than --scheduler-ttl 1 s" in entry.error
    assert 0 < client.pttl(keys.results("api0")) <= 1000
    assert lengths(client, keys) == (0, 1)


def test_a_second_request_under_a_held_id_fails_to_its_owner(
    config: SchedulerConfig, redis_server: EmbeddedRedis
) -> None:
    """Ranks key requests by id: a peer sending an id the rank already holds (another
    owner's, say) is refused to that peer, and the request held runs on."""
    link, keys = RedisLink(config, "test"), Keys(config.topic)
    client = redis.Redis(port=redis_server.port)
    enqueue(link, keys, request("same", owner="api0"))
    enqueue(link, keys, request("same", owner="api1"))
    inbox = RankInbox(config, "r0")
    taken = inbox.take(10)
    assert [(r.request_id, r.owner) for r in taken] == [("same", "api0")]
    (raw,) = client.lrange(keys.results("api1"), 0, -1)
    (entry,) = parse(pb.ResultBatch, raw).entries
    assert entry.finish_reason == "error" and "already held by r0" in entry.error
    assert client.llen(keys.results("api0")) == 0
    assert lengths(client, keys) == (0, 1)


def test_withdraw_before_take_and_abort_after(config: SchedulerConfig) -> None:
    link, keys = RedisLink(config, "test"), Keys(config.topic)
    entry_a = enqueue(link, keys, request("a"))
    entry_b = enqueue(link, keys, request("b"))
    assert withdraw(link, keys, "r0", entry_a), "still queued: withdrawn, never runs"
    inbox = RankInbox(config, "r0")
    assert [r.request_id for r in inbox.take(10)] == ["b"]
    assert not withdraw(link, keys, "r0", entry_b), "taken: the rank must be told"
    send_abort(link, keys, "r0", ["b", "unknown"])
    assert inbox.take_aborts() == ["b"]
    assert inbox.take_aborts() == []


def test_abort_that_overtakes_its_request_drops_it_on_arrival(config: SchedulerConfig) -> None:
    link, keys = RedisLink(config, "test"), Keys(config.topic)
    inbox = RankInbox(config, "r0")
    send_abort(link, keys, "r0", ["racer"])
    assert inbox.take_aborts() == []
    enqueue(link, keys, request("racer"))
    enqueue(link, keys, request("other"))
    assert [r.request_id for r in inbox.take(10)] == ["other"]
    assert inbox.num_taken == 1


def test_malformed_entries_are_skipped_with_a_warning(
    config: SchedulerConfig, redis_server: EmbeddedRedis, caplog
) -> None:
    link, keys = RedisLink(config, "test"), Keys(config.topic)
    client = redis.Redis(port=redis_server.port)
    client.lpush(keys.queue("r0"), b"\x00garbage\xff")
    future = request("future")
    future.schema_version = 7
    client.lpush(keys.queue("r0"), future.SerializeToString())
    client.lpush(keys.queue("r0"), encode(pb.DispatchedRequest()))  # right schema, no fields
    enqueue(link, keys, request("ok"))
    client.rpush(keys.control("r0"), b"\xffnot a control message")
    inbox = RankInbox(config, "r0")
    with caplog.at_level(logging.WARNING, logger="scheduler.request_queue"):
        assert [r.request_id for r in inbox.take(10)] == ["ok"]
        assert inbox.take_aborts() == []
    assert inbox.num_malformed == 3
    assert len(caplog.records) == 4
    assert lengths(client, keys) == (0, 1), "malformed entries do not linger"
