"""Settles the requests of ranks that died: any live instance runs a Reaper; a Redis
lock lets one of them act at a time.

A rank is dead when its registry key has expired. Then, for each entry it left:
- queued in ``T:req:<dead>`` (never taken): re-dispatched to a live rank of a role
  that can prefill it, or failed to its owner when there is none;
- taken, in ``T:proc:<dead>``: failed to its owner ("<role> instance <id> lost"); it
  may have produced tokens already, so running it again could repeat them.
Every move and every failure is one atomic script that first removes the entry, so a
reaper that dies half-way or two that race can neither lose nor duplicate a request.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.dispatch_policy import RankLoad, near_least, prefill_cost
from scheduler.keys import Keys
from scheduler.records import MalformedRecord, encode, parse_request
from scheduler.redis_link import RedisLink, SchedulerUnavailable
from scheduler.registry import RegistryReader
from scheduler.request_queue import fail_taken

logger = logging.getLogger(__name__)

# KEYS: dead queue, live queue; ARGV: old entry, new entry. RPUSH: the moved request is
# older than anything queued there, so it is taken first.
MOVE_SCRIPT = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
MAX_ENTRIES_PER_PASS = 10_000


class Reaper:
    def __init__(self, config: SchedulerConfig, name: str, rng: random.Random | None = None):
        self.config = config
        self.name = name
        self.keys = Keys(config.topic)
        self.rng = rng or random.Random()
        self.ttl_ms = int(config.ttl_s * 1000)
        self.interval_s = min(config.expire_period_s / 4, 0.5)
        self._link = RedisLink(config, f"reaper[{name}]")
        self._registry = RegistryReader(config, name=f"reaper[{name}]")
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reaper-{name}", daemon=True)
        self.num_redispatched = 0
        self.num_failed = 0

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._link.close()
        self._registry.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except SchedulerUnavailable:
                self._link.pause_after_failure(self._stop)

    def run_once(self) -> bool:
        """One pass; False when another instance holds the lock."""
        lock_ms = max(int(self.config.expire_period_ms), 1000)
        if not self._link.call(
            lambda r: r.set(self.keys.reaper_lock, self._token, nx=True, px=lock_ms)
        ):
            return False
        try:
            live = self._registry.snapshot(max_age_s=0)
            live_ids = {rank.rank_id for rank in live}
            for kind in ("req", "proc"):
                for key in self._scan(self.keys.rank_keys_pattern(kind)):
                    dead = self.keys.rank_of(key)
                    if dead in live_ids:
                        continue
                    if kind == "req":
                        self._redispatch(key, dead, live)
                    else:
                        self._fail_taken(key, dead)
            return True
        finally:
            self._link.call(lambda r: r.eval(RELEASE_SCRIPT, 1, self.keys.reaper_lock, self._token))

    def _scan(self, pattern: str) -> list[str]:
        return [k.decode() for k in self._link.call(lambda r: list(r.scan_iter(match=pattern)))]

    def _entries(self, key: str) -> list[bytes]:
        # Newest first: each is RPUSHed onto its new queue, so the oldest is taken first there.
        return self._link.call(lambda r: r.lrange(key, -MAX_ENTRIES_PER_PASS, -1))

    def _redispatch(self, key: str, dead: str, live: list[RankLoad]) -> None:
        # NOTE: loads in the snapshot do not count what this pass adds; spreading by a
        # random pick among the least-loaded keeps one rank from getting all of them.
        targets = [rank for rank in live if rank.role in ("prefill", "mixed")]
        costs = {rank.rank_id: prefill_cost(rank) for rank in targets}
        for entry in self._entries(key):
            request = self._parse(key, entry)
            if request is None:
                continue
            if not targets:
                self._fail(
                    key,
                    entry,
                    request,
                    self._lost(dead, request, "and no live prefill or mixed rank can take it"),
                )
                continue
            target = near_least(targets, costs, 0.1, self.rng)
            moved = pb.DispatchedRequest()
            moved.CopyFrom(request)
            moved.prefill_rank_id = target.rank_id
            if target.role == "mixed":
                moved.decode_rank_id = target.rank_id
            elif request.decode_rank_id == dead:
                moved.decode_rank_id = ""  # the new prefill rank picks one
                moved.protocol = ""
            moved.num_redispatches += 1
            done = self._link.call(
                lambda r, m=moved, e=entry, t=target: r.eval(
                    MOVE_SCRIPT, 2, key, self.keys.queue(t.rank_id), e, encode(m)
                )
            )
            if done:
                self.num_redispatched += 1
                logger.warning(
                    "reaper: request %s re-dispatched from lost rank %s to %s",
                    request.request_id, dead, target.rank_id,
                )  # fmt: skip

    def _fail_taken(self, key: str, dead: str) -> None:
        for entry in self._entries(key):
            request = self._parse(key, entry)
            if request is not None:
                self._fail(key, entry, request, self._lost(dead, request))
        self._link.call(lambda r: r.delete(self.keys.control(dead)))

    def _lost(self, dead: str, request: pb.DispatchedRequest, why: str = "") -> str:
        role = "decode" if dead == request.decode_rank_id != request.prefill_rank_id else "prefill"
        return f"{role} instance {dead} lost" + (f" {why}" if why else "")

    def _fail(self, key: str, entry: bytes, request: pb.DispatchedRequest, message: str) -> None:
        if self._link.call(
            lambda r: fail_taken(r, self.keys, key, entry, request, message, self.ttl_ms)
        ):
            self.num_failed += 1
            logger.warning("reaper: request %s failed: %s", request.request_id, message)

    def _parse(self, key: str, entry: bytes) -> pb.DispatchedRequest | None:
        try:
            return parse_request(entry)
        except MalformedRecord as e:
            logger.warning("reaper: dropping a malformed entry of %s: %s", key, e)
            self._link.call(lambda r: r.lrem(key, 1, entry))
            return None
