"""The splitwise scheduler: the two ends of the Redis path, composed from the registry,
the reliable queues, the result channels and the reaper.

- ``SplitwiseFrontend`` is what an API server holds: ``submit`` picks the ranks from a
  cached registry snapshot and queues the request; results reach ``sink`` in order;
  ``abort`` withdraws a queued request or tells the ranks holding it. When Redis
  restarts (and loses its lists), requests no rank had taken are queued again and
  those that had started but are no longer held anywhere fail with a clear error.
- ``SplitwiseRank`` is what an engine rank holds: its registration (with load), its
  inbox, and a result writer flushed once per engine step.
Both run a Reaper; the Redis lock lets one act at a time.
"""

from __future__ import annotations

import logging
import random
import threading

from proto import cluster_pb2 as pb
from scheduler.config import ID_PATTERN, SchedulerConfig, check_id
from scheduler.dispatch_policy import Dispatch, NoRankAvailable, dispatch
from scheduler.keys import Keys
from scheduler.reaper import Reaper
from scheduler.records import MalformedRecord, parse_request
from scheduler.redis_link import RedisLink, SchedulerUnavailable
from scheduler.registry import RankRegistration, RegistryReader
from scheduler.request_queue import RankInbox, enqueue, send_abort, withdraw
from scheduler.result_channel import ResultReader, ResultWriter, Sink

logger = logging.getLogger(__name__)


class SplitwiseFrontend:
    def __init__(
        self,
        config: SchedulerConfig,
        api_id: str,
        sink: Sink,
        rng: random.Random | None = None,
        run_reaper: bool = True,
    ):
        self.config = config
        self.api_id = check_id("api id", api_id)
        self.keys = Keys(config.topic)
        self.rng = rng or random.Random()
        self.registry = RegistryReader(config, name=f"frontend[{api_id}]")
        self._link = RedisLink(config, f"frontend[{api_id}]")
        self._sink = sink
        self.results = ResultReader(config, api_id, self._deliver).start()
        self.reaper = Reaper(config, api_id).start() if run_reaper else None
        self._lock = threading.Lock()
        self._in_flight: dict[str, tuple[pb.DispatchedRequest, bytes]] = {}
        self._started: set[str] = set()  # in flight and has had results
        # request id -> the rank whose results came last: a prefill rank may have retried
        # the request on another decode rank than the one dispatch picked
        self._last_rank: dict[str, str] = {}
        self._stop = threading.Event()
        self._server_id = self._link.server_id()  # before any request: a restart is noticed
        self._watcher = threading.Thread(
            target=self._watch_restarts, name=f"restarts-{api_id}", daemon=True
        )
        self._watcher.start()

    def submit(self, request: pb.DispatchedRequest) -> Dispatch:
        """Pick ranks for ``request`` and queue it. Raises NoRankAvailable when no live
        rank can take it, SchedulerUnavailable when Redis cannot be reached."""
        check_id("request id", request.request_id)
        return self._queue(request)

    def _queue(self, request: pb.DispatchedRequest) -> Dispatch:
        picked = dispatch(self.registry.snapshot(), len(request.prompt_token_ids), self.rng)
        request.owner = self.api_id
        request.prefill_rank_id = picked.prefill.rank_id
        request.decode_rank_id = picked.decode.rank_id
        request.protocol = picked.protocol or ""
        self.results.expect(request.request_id)
        try:
            entry = enqueue(self._link, self.keys, request)
        except BaseException:
            self.results.forget(request.request_id)
            raise
        with self._lock:
            self._in_flight[request.request_id] = (request, entry)
        return picked

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; its later results are discarded."""
        self.results.forget(request_id)
        with self._lock:
            found = self._in_flight.pop(request_id, None)
            self._started.discard(request_id)
            last_rank = self._last_rank.pop(request_id, "")
        if found is None:
            return
        request, entry = found
        if withdraw(self._link, self.keys, request.prefill_rank_id, entry):
            return  # never taken
        ranks = {request.prefill_rank_id, request.decode_rank_id, last_rank} - {""}
        for rank_id in sorted(ranks):
            send_abort(self._link, self.keys, rank_id, [request_id])

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def _deliver(self, request_id: str, entries: list[pb.ResultEntry]) -> None:
        with self._lock:
            if entries[-1].finish_reason:
                self._in_flight.pop(request_id, None)
                self._started.discard(request_id)
                self._last_rank.pop(request_id, None)
            else:
                self._started.add(request_id)
                if entries[-1].rank_id and ID_PATTERN.fullmatch(entries[-1].rank_id):
                    self._last_rank[request_id] = entries[-1].rank_id
        self._sink(request_id, entries)

    def _watch_restarts(self) -> None:
        while not self._stop.wait(self.config.heartbeat_interval_s):
            try:
                now = self._link.server_id()
                if now != self._server_id:
                    # Give every rank a heartbeat or two to re-register and restore its
                    # taken requests, then settle ours that Redis no longer holds.
                    self._stop.wait(self.config.expire_period_s)
                    self._recover()
                self._server_id = now
            except SchedulerUnavailable:
                self._link.pause_after_failure(self._stop)
            except NoRankAvailable as e:
                logger.warning("%s: cannot re-queue after a Redis restart: %s", self.api_id, e)

    def _recover(self) -> None:
        held = self._held_request_ids()
        with self._lock:
            lost = [(rid, req) for rid, (req, _) in self._in_flight.items() if rid not in held]
            started = set(self._started)
        for request_id, request in lost:
            if request_id in started:
                message = f"request {request_id} was lost when the scheduler's Redis restarted"
                error = pb.ResultEntry(request_id=request_id, finish_reason="error", error=message)
                self.results.forget(request_id)
                self._deliver(request_id, [error])
            else:
                logger.warning("%s: re-queueing %s after a Redis restart", self.api_id, request_id)
                self._queue(request)

    def _held_request_ids(self) -> set[str]:
        """Ids of this API server's requests in any rank's queue or processing list."""
        held = set()
        for kind in ("req", "proc"):
            pattern = self.keys.rank_keys_pattern(kind)
            for key in self._link.call(lambda r, p=pattern: list(r.scan_iter(match=p))):
                for entry in self._link.call(lambda r, k=key: r.lrange(k, 0, -1)):
                    try:
                        request = parse_request(entry)
                    except MalformedRecord:
                        continue
                    if request.owner == self.api_id:
                        held.add(request.request_id)
        return held

    def close(self) -> None:
        self._stop.set()
        self._watcher.join(timeout=10)
        if self.reaper is not None:
            self.reaper.stop()
        self.results.stop()
        self.registry.close()
        self._link.close()


class SplitwiseRank:
    def __init__(self, config: SchedulerConfig, record: pb.InstanceRecord, run_reaper: bool = True):
        self.config = config
        self.rank_id = check_id("rank id", record.rank_id)
        self._link = RedisLink(config, f"rank[{record.rank_id}]")
        self.inbox = RankInbox(config, record.rank_id, self._link)
        self.registration = RankRegistration(config, record, on_redis_restart=self.inbox.restore)
        self.results = ResultWriter(config, record.rank_id)
        self.reaper = Reaper(config, record.rank_id) if run_reaper else None

    def start(self) -> SplitwiseRank:
        self.registration.start()
        if self.reaper is not None:
            self.reaper.start()
        return self

    def update_load(self, **load: int) -> None:
        self.registration.update_load(**load)

    def take(self, max_n: int, block_s: float = 0.0) -> list[pb.DispatchedRequest]:
        return self.inbox.take(max_n, block_s)

    def take_aborts(self) -> list[str]:
        return self.inbox.take_aborts()

    def adopt(self, request: pb.DispatchedRequest) -> None:
        """A decode rank holds a committed request: from here the reaper answers for it."""
        self.inbox.adopt(request)

    def unadopt(self, request_id: str) -> None:
        self.inbox.unadopt(request_id)

    def was_aborted(self, request_id: str) -> bool:
        return self.inbox.was_aborted(request_id)

    def add_result(self, owner: str, entry: pb.ResultEntry) -> None:
        self.results.add(owner, entry)

    def end_step(self, finished_request_ids: list[str]) -> None:
        """One round trip: the step's results, then the finished requests' release.
        Raises SchedulerUnavailable when Redis is down; what was not sent stays pending
        and goes with the next step's call."""
        self.inbox.finish(finished_request_ids)
        pipe = self._link.client.pipeline(transaction=False)
        self.results.flush_into(pipe)
        self.inbox.release_into(pipe)
        if len(pipe):
            self._link.call(lambda r: pipe.execute())
        self.results.sent()
        self.inbox.released()

    def close(self, deregister: bool = True) -> None:
        if self.reaper is not None:
            self.reaper.stop()
        self.registration.stop(deregister)
        self._link.close()
