"""Reliable per-rank request queues.

    dispatcher --LPUSH--> T:req:<rank> --LMOVE (take)--> T:proc:<rank> --LREM (finish)--> gone

An entry is in exactly one of the two lists until the rank finishes it: ``take`` moves it
atomically, so a rank that dies leaves every request it knew of in Redis, where the
reaper finds it (queued: re-dispatched; taken: failed to its owner). A rank takes only
as many entries as it can schedule now.
"""

from __future__ import annotations

import logging
import time

import redis

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.keys import Keys
from scheduler.records import MalformedRecord, encode, error_batch, parse, parse_request
from scheduler.redis_link import RedisLink

logger = logging.getLogger(__name__)

MAX_ABORTS_PER_POLL = 1000
MAX_REMEMBERED_ABORTS = 10_000

# Move up to ARGV[1] entries, oldest first, from the queue to the processing list.
TAKE_SCRIPT = """
local taken = {}
for i = 1, tonumber(ARGV[1]) do
  local entry = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not entry then break end
  taken[i] = entry
end
return taken
"""

# Settle a taken entry with an error for its owner, atomically: the error is written
# only by whoever removes the entry, so no owner sees two. KEYS: proc list, result
# list; ARGV: entry, ResultBatch, result TTL in ms.
FAIL_TAKEN_SCRIPT = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return 1
end
return 0
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def enqueue(link: RedisLink, keys: Keys, request: pb.DispatchedRequest) -> bytes:
    """Queue a request on its prefill rank; returns the stored entry (for ``withdraw``)."""
    if not request.enqueued_at_ms:
        request.enqueued_at_ms = now_ms()
    entry = encode(request)
    link.call(lambda r: r.lpush(keys.queue(request.prefill_rank_id), entry))
    return entry


def withdraw(link: RedisLink, keys: Keys, rank_id: str, entry: bytes) -> bool:
    """Remove a request that is still queued; False when the rank has already taken it."""
    return link.call(lambda r: r.lrem(keys.queue(rank_id), 1, entry)) == 1


def send_abort(link: RedisLink, keys: Keys, rank_id: str, request_ids: list[str]) -> None:
    message = encode(pb.ControlMessage(abort_request_ids=request_ids))
    link.call(lambda r: r.rpush(keys.control(rank_id), message))


def fail_taken(
    client: redis.Redis,
    keys: Keys,
    proc_key: str,
    entry: bytes,
    request: pb.DispatchedRequest,
    message: str,
    ttl_ms: int,
    rank_id: str = "",
) -> bool:
    """End a taken request with ``message`` to its owner; False if someone else settled it."""
    batch = error_batch(request.request_id, message, rank_id)
    settled = client.eval(
        FAIL_TAKEN_SCRIPT, 2, proc_key, keys.results(request.owner), entry, batch, ttl_ms
    )
    return settled == 1


class RankInbox:
    """A rank's end of its queue and control list. Requests it takes are its own until
    ``finish``; requests queued longer than ``--scheduler-ttl`` are failed, not run."""

    def __init__(self, config: SchedulerConfig, rank_id: str, link: RedisLink | None = None):
        self.config = config
        self.rank_id = rank_id
        self.keys = Keys(config.topic)
        self.queue_key = self.keys.queue(rank_id)
        self.proc_key = self.keys.processing(rank_id)
        self.ctl_key = self.keys.control(rank_id)
        self._link = link or RedisLink(config, f"inbox[{rank_id}]")
        self._take = self._link.client.register_script(TAKE_SCRIPT)
        self._entries: dict[str, bytes] = {}  # request id -> its entry in T:proc
        self._aborted: dict[str, None] = {}  # aborts that arrived before their request
        self._finished: set[str] = set()  # finished, entry not yet removed from T:proc
        self.num_expired = 0
        self.num_malformed = 0

    def take(self, max_n: int, block_s: float = 0.0) -> list[pb.DispatchedRequest]:
        """Take up to ``max_n`` queued requests (waiting up to ``block_s`` for the first)."""
        if max_n <= 0:
            return []
        raw: list[bytes] = []
        if block_s > 0:
            first = self._link.call(
                lambda r: r.blmove(self.queue_key, self.proc_key, block_s, "RIGHT", "LEFT")
            )
            if first is None:
                return []
            raw.append(first)
        if len(raw) < max_n:
            raw += self._link.call(
                lambda r: self._take(
                    keys=[self.queue_key, self.proc_key], args=[max_n - len(raw)], client=r
                )
            )
        return [request for entry in raw if (request := self._accept(entry)) is not None]

    def _accept(self, entry: bytes) -> pb.DispatchedRequest | None:
        try:
            request = parse_request(entry)
        except MalformedRecord as e:
            self.num_malformed += 1
            logger.warning("%s: dropping a malformed queue entry: %s", self.rank_id, e)
            self._link.call(lambda r: r.lrem(self.proc_key, 1, entry))
            return None
        if request.request_id in self._aborted:
            del self._aborted[request.request_id]
            self._link.call(lambda r: r.lrem(self.proc_key, 1, entry))
            return None
        age_s = (now_ms() - request.enqueued_at_ms) / 1000
        message = None
        if request.request_id in self._entries:
            # Another owner's request under an id this rank already holds: refused to its
            # owner; the one held runs on (keyed by id, both would corrupt each other).
            self.num_malformed += 1
            message = (
                f"request id {request.request_id} is already held by {self.rank_id}: "
                "request ids must be unique in the topic"
            )
        elif age_s > self.config.ttl_s:
            self.num_expired += 1
            message = (
                f"request {request.request_id} waited {age_s:.0f} s in the queue of "
                f"{self.rank_id}, longer than --scheduler-ttl {self.config.ttl_s:g} s"
            )
        if message is not None:
            self._link.call(
                lambda r: fail_taken(
                    r, self.keys, self.proc_key, entry, request, message, self._ttl_ms, self.rank_id
                )
            )
            return None
        self._entries[request.request_id] = entry
        return request

    def adopt(self, request: pb.DispatchedRequest) -> None:
        """Take responsibility for a request that arrived another way (a decode rank's
        Commit): its entry goes into T:proc so that the reaper settles it if we die."""
        entry = encode(request)
        self._link.call(lambda r: r.lpush(self.proc_key, entry))
        self._entries[request.request_id] = entry

    def unadopt(self, request_id: str) -> None:
        """Take back an ``adopt`` whose request could not be run after all."""
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self._link.call(lambda r: r.lrem(self.proc_key, 1, entry))

    def was_aborted(self, request_id: str) -> bool:
        """Whether an abort for ``request_id`` came before the request (consumes it)."""
        if request_id not in self._aborted:
            return False
        del self._aborted[request_id]
        return True

    def finish(self, request_ids: list[str]) -> None:
        """Mark requests finished; their entries leave T:proc with the next ``release_into``."""
        self._finished.update(request_ids)

    def release_into(self, pipe: redis.client.Pipeline) -> None:
        """Queue the removal of finished requests' entries on ``pipe`` (sent after the
        step's results: a crash in between leaves the entry, and the reaper's error then
        reaches an owner that has already closed the request); ``released()`` once sent."""
        for request_id in self._finished:
            entry = self._entries.get(request_id)
            if entry is not None:
                pipe.lrem(self.proc_key, 1, entry)

    def released(self) -> None:
        for request_id in self._finished:
            self._entries.pop(request_id, None)
        self._finished.clear()

    def restore(self) -> None:
        """Rewrite T:proc after a Redis restart lost it (called off the engine loop)."""
        entries = list(self._entries.values())
        if entries:
            self._link.call(lambda r: r.lpush(self.proc_key, *entries))

    @property
    def num_taken(self) -> int:
        return len(self._entries)

    def take_aborts(self) -> list[str]:
        """Request ids the owners aborted since the last call. Ids not taken yet are
        remembered, so that a request withdrawn too late is dropped when it arrives."""
        raw = self._link.call(
            lambda r: r.lpop(self.keys.control(self.rank_id), MAX_ABORTS_PER_POLL)
        )
        aborted: list[str] = []
        for message in raw or []:
            try:
                aborted += parse(pb.ControlMessage, message).abort_request_ids
            except MalformedRecord as e:
                logger.warning("%s: skipping a malformed control message: %s", self.rank_id, e)
        for request_id in aborted:
            if request_id not in self._entries:
                self._aborted[request_id] = None
        while len(self._aborted) > MAX_REMEMBERED_ABORTS:
            del self._aborted[next(iter(self._aborted))]
        return [i for i in aborted if i in self._entries]

    @property
    def _ttl_ms(self) -> int:
        return int(self.config.ttl_s * 1000)
