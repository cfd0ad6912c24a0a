"""Rank 0's view of its TP ranks' KV transfer (``pd.rank.rank_transfer`` runs on each).

    decode   ``ShardedReceiver``: what pd-comm's service needs of one protocol (layout,
             ``allow``, ``revoke``, ``endpoints``), done on every TP rank
    prefill  ``PrefillWrites``: ``flush`` a transfer on every rank, ``send_all`` for a
             retry, and ``wait`` for every rank's report of a transfer

With TP 1 the one rank is this process and calls go straight to it. With more, a call
reaches the workers through the executor, which only the engine loop may drive: calls
from other threads (gRPC handlers, hand-off threads) are run on the loop.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from engine.kv_cache import KVCacheLayout
from engine.plan_codec import send_to_wire
from engine.step_plan import KVSend, KVTarget
from pd.rank.loop_calls import LoopCalls

_LOOP_TIMEOUT_S = 5.0


class RankCalls:
    """``call_extension`` on every TP rank, from any thread."""

    def __init__(self, executor, calls: LoopCalls):  # type: ignore[no-untyped-def]
        self.executor = executor
        self.calls = calls
        self.loop_thread = threading.current_thread()  # built on the engine loop

    def __call__(self, method: str, *args: object) -> list:
        if threading.current_thread() is self.loop_thread:
            return self.executor.call_extension(method, *args)
        if self.executor.tp_size == 1:  # the rank is this process: its calls are thread-safe
            return [getattr(self.executor.extension, method)(*args)]
        return self.calls.call(lambda: self.executor.call_extension(method, *args), _LOOP_TIMEOUT_S)


class ShardedReceiver:
    """One protocol's receivers, one per TP rank, as pd-comm's service sees them."""

    def __init__(
        self, protocol: str, layout: KVCacheLayout, endpoints: list[dict], calls: RankCalls
    ):
        self.protocol = protocol
        self.layout = layout  # every rank's pool has these block ids and this shape
        self._endpoints = endpoints
        self._calls = calls

    def endpoint(self) -> dict:
        return self._endpoints[0]

    def endpoints(self) -> list[dict]:
        return self._endpoints

    def allow(self, transfer_id: bytes, byte_ranges: list[tuple[int, int]]) -> None:
        ranges = [[int(start), int(end)] for start, end in byte_ranges]
        self._calls("allow", self.protocol, transfer_id, ranges)

    def revoke(self, transfer_id: bytes) -> None:
        """Returns once no rank accepts a write of ``transfer_id`` any more."""
        self._calls("revoke", self.protocol, transfer_id)


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
        self._reports: dict[tuple[str, bytes], dict[int, list]] = {}
        self._changed = threading.Condition()

    def add(self, report: list) -> None:
        peer_key, transfer_id, rank = report[0], report[1], report[2]
        with self._changed:
            self._reports.setdefault((peer_key, transfer_id), {})[rank] = report
            self._changed.notify_all()

    def wait(self, target: KVTarget, timeout_s: float) -> WriteOutcome:
        key = (target.peer_key, target.transfer_id)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self._reports.get(key, ())) < self.num_ranks:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            reports = self._reports.pop(key, {})
        missing = sorted(set(range(self.num_ranks)) - set(reports))
        errors = [r[3] for r in reports.values() if r[3] is not None]
        if missing:
            errors.append(f"TP rank(s) {missing} did not report within {timeout_s} s")
        return WriteOutcome(
            "; ".join(errors) or None,
            sum(r[4] for r in reports.values()),
            max((r[5] for r in reports.values()), default=0.0),
        )


class PrefillWrites:
    """A prefill rank's writes over all its TP ranks."""

    def __init__(self, calls: RankCalls, reports: WriteReports):
        self._calls = calls
        self.reports = reports

    def flush(self, target: KVTarget) -> None:
        """Every rank reports ``target``'s writes once they have landed; on the loop,
        after the steps that wrote them (the executor keeps the order)."""
        self._calls("flush", target.peer_key, target.transfer_id)

    def send_all(self, send: KVSend) -> None:
        """Every layer of ``send`` on every rank, then flush."""
        self._calls("send_all", [send_to_wire(send)])
        self.flush(send.target)

    def wait(self, target: KVTarget, timeout_s: float) -> WriteOutcome:
        return self.reports.wait(target, timeout_s)
