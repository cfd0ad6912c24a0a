"""A rank of a router-paired cluster (``pd-router --splitwise``): what ``SplitwiseRank``
is over Redis, without Redis.

- Requests reach a prefill rank from its own API server (``submit``), already paired
  with a decode rank by the router; they wait here until the loop ``take``s them, as
  they would in the rank's Redis queue.
- A decode rank ``adopt``s a request at Commit (pd-comm), as before.
- Results go straight to each request's owner (``scheduler/direct_results.py``); every
  beat the rank also names the requests it holds for each owner, which is how an owner
  learns that a rank died (there is no reaper).
- Aborts come from the owner: over ZMQ for the prefill rank, as a pd-comm Abort for
  the decode rank. One that arrives before its request (a Commit still in flight) is
  remembered, so the Commit is refused.
- An owner this rank cannot reach for ``owner_timeout_s`` is gone (it failed its
  requests after as long a silence): its requests are stopped here, freeing their KV.

Loop thread only, like the rest of the rank's state.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque

from proto import cluster_pb2 as pb
from scheduler.direct_results import ResultPusher, check_owner

logger = logging.getLogger(__name__)

MAX_REMEMBERED_ABORTS = 10_000


class DirectRank:
    def __init__(self, rank_id: str, key: bytes | None, beat_s: float, owner_timeout_s: float):
        """``key``: the result frames' MAC key (``pd.cluster_secret.results_key``)."""
        self.rank_id = rank_id
        self.results = ResultPusher(rank_id, key, beat_s)
        self.beat_s = beat_s
        self.owner_timeout_s = owner_timeout_s
        self._next_owner_check = 0.0
        self._stopping: set[str] = set()  # held requests of gone owners, being aborted
        self._queued: deque[pb.DispatchedRequest] = deque()
        self._held: dict[str, str] = {}  # request id -> owner: queued, taken or adopted
        self._aborts: list[str] = []  # of held requests, for the loop
        self._aborted: OrderedDict[str, None] = OrderedDict()  # before their request came

    # -- requests in -----------------------------------------------------------------

    def submit(self, request: pb.DispatchedRequest) -> None:
        """Queue a paired request; ValueError for an id held here or a bad owner."""
        check_owner(request.owner)
        if request.request_id in self._held:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._queued.append(request)
        self._held[request.request_id] = request.owner

    def take(self, max_n: int, block_s: float = 0.0) -> list[pb.DispatchedRequest]:
        """Up to ``max_n`` queued requests, oldest first (never blocks: requests arrive
        on the loop's own channel, which wakes it)."""
        taken = []
        while self._queued and len(taken) < max_n:
            taken.append(self._queued.popleft())
        return taken

    def adopt(self, request: pb.DispatchedRequest) -> None:
        check_owner(request.owner)
        self._held[request.request_id] = request.owner

    def unadopt(self, request_id: str) -> None:
        self._held.pop(request_id, None)

    # -- aborts ----------------------------------------------------------------------

    def abort(self, request_id: str) -> None:
        """The owner gave up: a queued request is dropped here, a running one goes to the
        loop (``take_aborts``), an unknown one is remembered for its Commit."""
        if request_id not in self._held:
            self._aborted[request_id] = None
            while len(self._aborted) > MAX_REMEMBERED_ABORTS:
                self._aborted.popitem(last=False)
            return
        queued = [r for r in self._queued if r.request_id == request_id]
        if queued:
            self._queued.remove(queued[0])
            del self._held[request_id]
            self._stopping.discard(request_id)
            return
        self._aborts.append(request_id)

    def take_aborts(self) -> list[str]:
        aborts, self._aborts = self._aborts, []
        return aborts

    def was_aborted(self, request_id: str) -> bool:
        return request_id in self._aborted

    # -- results out -----------------------------------------------------------------

    def add_result(self, owner: str, entry: pb.ResultEntry) -> None:
        self.results.add(owner, entry)

    def end_step(self, finished_request_ids: list[str]) -> None:
        """Send the step's results (and, on a beat, what is held); release the finished."""
        for request_id in finished_request_ids:
            self._held.pop(request_id, None)
            self._stopping.discard(request_id)
        self.results.flush(self._held_by_owner)
        self._stop_requests_of_gone_owners()

    def _stop_requests_of_gone_owners(self) -> None:
        now = time.monotonic()
        if now < self._next_owner_check:
            return
        self._next_owner_check = now + self.beat_s
        gone = set(self.results.unreachable(self.owner_timeout_s))
        if not gone:
            return
        for request_id, owner in list(self._held.items()):
            if owner in gone and request_id not in self._stopping:
                logger.warning("%s: stopping %s: its owner %s is unreachable", self.rank_id,
                               request_id, owner)  # fmt: skip
                self._stopping.add(request_id)
                self.abort(request_id)

    def _held_by_owner(self) -> dict[str, list[str]]:
        by_owner: dict[str, list[str]] = {}
        for request_id, owner in self._held.items():
            by_owner.setdefault(owner, []).append(request_id)
        return by_owner

    def update_load(self, **load: int) -> None:
        """The router sees load in the API servers' heartbeats; nothing to publish."""

    @property
    def num_queued(self) -> int:
        return len(self._queued)

    def close(self, deregister: bool = True) -> None:
        self.results.close()
