"""The ``local`` scheduler: one instance, no Redis (the default of ``pd-serve``).

Requests wait here, in memory and in arrival order, until the rank takes them, so the
engine's own waiting queue holds only what it can schedule; results go back through
the ``deliver`` callback once per step. It has the rank-side interface of the splitwise
scheduler (``scheduler/interface.py``); its producer side is ``put``/``abort``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


@dataclass
class _Queued(Generic[Request]):
    owner: Hashable
    request: Request
    num_prompt_tokens: int


class LocalScheduler(Generic[Request, Result]):
    def __init__(self, deliver: Callable[[Hashable, list[Result]], None]):
        self._deliver = deliver
        self._cond = threading.Condition()
        self._queued: OrderedDict[str, _Queued[Request]] = OrderedDict()
        self._taken: set[str] = set()
        self._aborted: list[str] = []
        self._results: dict[Hashable, list[Result]] = defaultdict(list)
        self.load: dict[str, int] = {}

    # -- producer side -------------------------------------------------------------

    def put(
        self, request_id: str, owner: Hashable, request: Request, num_prompt_tokens: int
    ) -> None:
        with self._cond:
            if request_id in self._queued or request_id in self._taken:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._queued[request_id] = _Queued(owner, request, num_prompt_tokens)
            self._cond.notify()

    def abort(self, request_ids: list[str]) -> list[tuple[Hashable, str]]:
        """Abort requests. Returns (owner, id) of those withdrawn before the rank took
        them (the caller tells their owners); taken ones reach ``take_aborts``."""
        withdrawn = []
        with self._cond:
            for request_id in request_ids:
                queued = self._queued.pop(request_id, None)
                if queued is not None:
                    withdrawn.append((queued.owner, request_id))
                elif request_id in self._taken:
                    self._aborted.append(request_id)
        return withdrawn

    @property
    def num_queued(self) -> int:
        return len(self._queued)

    @property
    def num_queued_prompt_tokens(self) -> int:
        with self._cond:
            return sum(q.num_prompt_tokens for q in self._queued.values())

    # -- rank side (scheduler.interface.RankScheduler) -----------------------------

    def take(self, max_n: int, block_s: float = 0.0) -> list[tuple[Hashable, str, Request]]:
        """Up to ``max_n`` (owner, request id, request), oldest first."""
        if max_n <= 0:
            return []
        with self._cond:
            if not self._queued and block_s > 0:
                self._cond.wait(block_s)
            taken = []
            while self._queued and len(taken) < max_n:
                request_id, queued = self._queued.popitem(last=False)
                self._taken.add(request_id)
                taken.append((queued.owner, request_id, queued.request))
            return taken

    def take_aborts(self) -> list[str]:
        with self._cond:
            aborted, self._aborted = self._aborted, []
            return aborted

    def add_result(self, owner: Hashable, entry: Result) -> None:
        self._results[owner].append(entry)

    def end_step(self, finished_request_ids: list[str]) -> None:
        with self._cond:
            self._taken.difference_update(finished_request_ids)
        results, self._results = self._results, defaultdict(list)
        for owner, entries in results.items():
            self._deliver(owner, entries)

    def update_load(self, **load: int) -> None:
        self.load = load

    def close(self) -> None:
        with self._cond:
            self._queued.clear()
            self._cond.notify_all()
