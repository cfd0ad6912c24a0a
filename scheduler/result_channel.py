"""Result channels: each API server reads its own list ``T:res:<api id>``.

Ranks batch what one engine step produced for one API server into one ResultBatch (one
RPUSH per API server per step, all in one pipeline). The reader hands each request's
entries to its sink in token order (``scheduler/result_order.py``).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable

import redis

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.keys import Keys
from scheduler.records import MalformedRecord, encode, parse
from scheduler.redis_link import RedisLink, SchedulerUnavailable
from scheduler.result_order import ResultOrder

logger = logging.getLogger(__name__)

DRAIN_BATCH = 256
# Called with a request id and its next entries, in order; the last one of a finished
# request has finish_reason set ("error" carries the message in ``error``).
Sink = Callable[[str, list[pb.ResultEntry]], None]


class ResultWriter:
    """A rank's side: collect a step's entries per owner, send them in one pipeline."""

    def __init__(self, config: SchedulerConfig, rank_id: str):
        self.keys = Keys(config.topic)
        self.rank_id = rank_id
        self.ttl_ms = int(config.ttl_s * 1000)
        self._pending: dict[str, list[pb.ResultEntry]] = defaultdict(list)

    def add(self, owner: str, entry: pb.ResultEntry) -> None:
        entry.rank_id = self.rank_id
        self._pending[owner].append(entry)

    def flush_into(self, pipe: redis.client.Pipeline) -> None:
        """Queue the pending batches on ``pipe``; ``sent()`` once it has executed (until
        then they stay pending, so a step that could not reach Redis loses nothing)."""
        for owner, entries in self._pending.items():
            key = self.keys.results(owner)
            pipe.rpush(key, encode(pb.ResultBatch(entries=entries)))
            pipe.pexpire(key, self.ttl_ms)

    def sent(self) -> None:
        self._pending.clear()


class ResultReader:
    """An API server's side: a daemon thread drains ``T:res:<api id>`` (BLPOP, then up
    to DRAIN_BATCH more per round trip) and routes entries to ``sink``."""

    def __init__(self, config: SchedulerConfig, api_id: str, sink: Sink, poll_s: float = 0.25):
        self.key = Keys(config.topic).results(api_id)
        self.api_id = api_id
        self.sink = sink
        self.poll_s = poll_s
        self._link = RedisLink(config, f"results[{api_id}]", socket_timeout_s=poll_s + 5)
        self._lock = threading.Lock()
        self._order = ResultOrder()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"results-{api_id}", daemon=True)
        self.num_malformed = 0

    def expect(self, request_id: str) -> None:
        with self._lock:
            self._order.expect(request_id)

    def forget(self, request_id: str) -> None:
        """Stop routing a request (finished or aborted); its late entries are discarded."""
        with self._lock:
            self._order.forget(request_id)

    @property
    def num_expected(self) -> int:
        return len(self._order)

    @property
    def num_discarded(self) -> int:
        return self._order.num_discarded

    def start(self) -> ResultReader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.poll_s + 6)
        self._link.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batches = self._drain()
            except SchedulerUnavailable:
                self._link.pause_after_failure(self._stop)
                continue
            for raw in batches:
                self._route_batch(raw)

    def _drain(self) -> list[bytes]:
        first = self._link.call(lambda r: r.blpop([self.key], timeout=self.poll_s))
        if first is None:
            return []

        def rest(r: redis.Redis) -> list[bytes]:
            pipe = r.pipeline(transaction=True)
            pipe.lrange(self.key, 0, DRAIN_BATCH - 1)
            pipe.ltrim(self.key, DRAIN_BATCH, -1)
            return pipe.execute()[0]

        return [first[1], *self._link.call(rest)]

    def _route_batch(self, raw: bytes) -> None:
        try:
            batch = parse(pb.ResultBatch, raw)
        except MalformedRecord as e:
            self.num_malformed += 1
            logger.warning("%s: skipping a malformed result batch: %s", self.key, e)
            return
        ready: dict[str, list[pb.ResultEntry]] = defaultdict(list)
        with self._lock:
            for entry in batch.entries:
                ready[entry.request_id] += self._order.accept(entry)
        for request_id, entries in ready.items():
            if entries:
                self.sink(request_id, entries)
