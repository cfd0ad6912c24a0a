"""Rank 0's view of its TP ranks' KV transfer (``pd.rank.rank_transfer`` runs on each).

    decode   ``ShardedReceiver``: what pd-comm's service needs of one protocol (layout,
             ``allow``, ``revoke``, ``endpoints``), done on every TP rank at once, from
             pd-comm's threads (the executor's control calls: no step is waited for)
    prefill  ``PrefillWrites``: ``flush`` a transfer on every rank after the steps that
             wrote it, ``send_all`` for a retry, and ``wait`` for every rank's report

Calls that must keep their order with the steps go through the executor's plan
channel, which only the engine loop drives: from other threads they run on the loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.kv_cache import KVCacheLayout
from engine.plan_codec import send_to_wire
from engine.step_plan import KVSend, KVTarget
from pd.rank.loop_calls import CALL_TIMEOUT_S, LoopCalls
from pd.rank.rank_transfer import WriteReport

T = TypeVar("T")


class ShardedReceiver:
    """One protocol's receivers, one per TP rank, as pd-comm's service sees them."""

    def __init__(self, protocol: str, layout: KVCacheLayout, endpoints: list[dict], executor: Any):
        self.protocol = protocol
        self.layout = layout  # every rank's pool has these block ids and block bytes
        self._endpoints = endpoints
        self._executor = executor

    def endpoint(self) -> dict:
        return self._endpoints[0]

    def endpoints(self) -> list[dict]:
        return self._endpoints

    def allow(self, transfer_id: bytes, byte_ranges: list[tuple[int, int]]) -> None:
        ranges = [[int(start), int(end)] for start, end in byte_ranges]
        self._executor.call_extension("allow", self.protocol, transfer_id, ranges, ordered=False)

    def revoke(self, transfer_id: bytes) -> None:
        """Returns once no rank accepts a write of ``transfer_id`` any more."""
        self._executor.call_extension("revoke", self.protocol, transfer_id, ordered=False)


@dataclass
class WriteOutcome:
    error: str | None
    num_bytes: int
    seconds: float


class WriteReports:
    """Every TP rank's report of its writes of a transfer (``RankTransfer.flush``), as
    they arrive on whatever thread; ``wait`` returns when all ranks have reported."""

    def __init__(self, num_ranks: int):
        self.num_ranks = num_ranks
        self._reports: dict[tuple[str, bytes], dict[int, WriteReport]] = {}
        self._abandoned: set[tuple[str, bytes]] = set()  # waited for in vain
        self._changed = threading.Condition()

    def add(self, wire: list) -> None:
        report = WriteReport.from_wire(wire)
        key = (report.peer_key, report.transfer_id)
        with self._changed:
            if key in self._abandoned:  # too late: its waiter has answered already
                return
            self._reports.setdefault(key, {})[report.tp_rank] = report
            self._changed.notify_all()

    def wait(self, target: KVTarget, timeout_s: float) -> WriteOutcome:
        key = (target.peer_key, target.transfer_id)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self._reports.get(key, ())) < self.num_ranks:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abandoned.add(key)
                    break
                self._changed.wait(left)
            reports = self._reports.pop(key, {})
        missing = sorted(set(range(self.num_ranks)) - set(reports))
        errors = [r.error for r in reports.values() if r.error is not None]
        if missing:
            errors.append(f"TP rank(s) {missing} did not report within {timeout_s} s")
        return WriteOutcome(
            "; ".join(errors) or None,
            sum(r.num_bytes for r in reports.values()),
            max((r.seconds for r in reports.values()), default=0.0),
        )


class PrefillWrites:
    """A prefill rank's writes over all its TP ranks."""

    def __init__(self, executor: Any, calls: LoopCalls, reports: WriteReports):
        self._executor = executor
        self._calls = calls
        self._loop_thread = threading.current_thread()  # built on the engine loop
        self.reports = reports

    def connect(self, target: KVTarget) -> None:
        """Every rank connects to the peer ranks it will write to, now, from any thread
        (raises if one cannot)."""
        self._executor.call_extension(
            "connect", target.protocol, target.peer_key, target.endpoints, ordered=False
        )

    def flush(self, target: KVTarget) -> None:
        """Every rank reports ``target``'s writes once they have landed: on the loop,
        after the steps that wrote them (the plan channel keeps the order)."""
        self._on_loop(lambda: self._flush(target))

    def send_all(self, send: KVSend) -> None:
        """Every layer of ``send`` on every rank, then flush (one job on the loop: both
        happen or neither)."""

        def send_and_flush() -> None:
            self._executor.call_extension("send_all", [send_to_wire(send)])
            self._flush(send.target)

        self._on_loop(send_and_flush)

    def wait(self, target: KVTarget, timeout_s: float) -> WriteOutcome:
        return self.reports.wait(target, timeout_s)

    def _flush(self, target: KVTarget) -> None:
        self._executor.call_extension("flush", target.peer_key, target.transfer_id)

    def _on_loop(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._loop_thread or self._executor.tp_size == 1:
            return fn()  # with TP 1 the one rank is here, and its methods are thread-safe
        return self._calls.call(fn, CALL_TIMEOUT_S)
