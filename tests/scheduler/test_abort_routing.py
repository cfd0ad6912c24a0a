"""An abort reaches every rank that may hold the request: the prefill rank, the decode
rank dispatch picked, and the decode rank whose results came last (a prefill rank
retries on another decode rank when the first refuses; issue 17)."""

from __future__ import annotations

import time

import redis

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.keys import Keys
from scheduler.redis_server import EmbeddedRedis
from scheduler.splitwise import SplitwiseFrontend, SplitwiseRank
from tests.scheduler.conftest import make_record


def test_abort_reaches_the_decode_rank_the_request_was_retried_on(
    config: SchedulerConfig, redis_server: EmbeddedRedis
) -> None:
    client, keys = redis.Redis(port=redis_server.port), Keys(config.topic)
    prefill = SplitwiseRank(config, make_record("p0", role="prefill")).start()
    decodes = {
        rank_id: SplitwiseRank(config, make_record(rank_id, role="decode")).start()
        for rank_id in ("d0", "d1")
    }
    seen: list[pb.ResultEntry] = []
    frontend = SplitwiseFrontend(config, "api0", lambda _id, entries: seen.extend(entries))
    try:
        frontend.submit(pb.DispatchedRequest(request_id="r", prompt_token_ids=[1]))
        (request,) = prefill.take(1)
        other = ({"d0", "d1"} - {request.decode_rank_id}).pop()  # where prefill retried it
        retried = decodes[other]
        retried.add_result("api0", pb.ResultEntry(request_id="r", index=0, token_ids=[5],
                                                  rank_id=other))  # fmt: skip
        retried.end_step([])
        deadline = time.monotonic() + 5
        while not seen:
            assert time.monotonic() < deadline, "the result arrived"
            time.sleep(0.01)
        frontend.abort("r")
        for rank_id in ("p0", "d0", "d1"):
            assert client.llen(keys.control(rank_id)) == 1, rank_id
    finally:
        frontend.close()
        for rank in (prefill, *decodes.values()):
            rank.close()
