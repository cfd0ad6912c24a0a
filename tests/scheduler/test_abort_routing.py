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
    picked = SplitwiseRank(config, make_record("d0", role="decode")).start()
    retried = SplitwiseRank(config, make_record("d1", role="decode", num_blocks=1)).start()
    seen: list[pb.ResultEntry] = []
    frontend = SplitwiseFrontend(config, "api0", lambda _id, entries: seen.extend(entries))
    try:
        frontend.submit(pb.DispatchedRequest(request_id="r", prompt_token_ids=[1]))
        (request,) = prefill.take(1)
        assert request.decode_rank_id == "d0"  # the roomier decode rank
        retried.add_result("api0", pb.ResultEntry(request_id="r", index=0, token_ids=[5],
                                                  rank_id="d1"))  # fmt: skip
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
        for rank in (prefill, picked, retried):
            rank.close()
