"""The local scheduler: arrival order, capacity, aborts on both sides of take, delivery."""

from __future__ import annotations

import threading
import time

import pytest

from scheduler.local import LocalScheduler


def make() -> tuple[LocalScheduler[str, str], list[tuple[str, list[str]]]]:
    delivered: list[tuple[str, list[str]]] = []
    return LocalScheduler(lambda owner, entries: delivered.append((owner, entries))), delivered


def test_takes_in_arrival_order_up_to_capacity() -> None:
    scheduler, _ = make()
    for i in range(5):
        scheduler.put(f"r{i}", "api", f"request {i}", num_prompt_tokens=10 * i)
    assert scheduler.num_queued_prompt_tokens == 100
    assert [rid for _, rid, _ in scheduler.take(2)] == ["r0", "r1"]
    assert scheduler.take(0) == []
    assert [req for _, _, req in scheduler.take(10)] == ["request 2", "request 3", "request 4"]
    assert scheduler.num_queued == 0
    with pytest.raises(ValueError, match="already in use"):
        scheduler.put("r3", "api", "again", 1)


def test_abort_withdraws_queued_and_reports_taken() -> None:
    scheduler, _ = make()
    for i in range(3):
        scheduler.put(f"r{i}", f"api{i}", "x", 1)
    scheduler.take(1)
    assert scheduler.abort(["r0", "r2", "nobody"]) == [("api2", "r2")]
    assert scheduler.take_aborts() == ["r0"]
    assert scheduler.take_aborts() == []
    assert [rid for _, rid, _ in scheduler.take(10)] == ["r1"]


def test_results_are_delivered_per_owner_at_end_of_step() -> None:
    scheduler, delivered = make()
    scheduler.put("a", "api0", "x", 1)
    scheduler.put("b", "api1", "x", 1)
    scheduler.take(2)
    scheduler.add_result("api0", "a:1")
    scheduler.add_result("api1", "b:1")
    scheduler.add_result("api0", "a:2")
    assert delivered == []
    scheduler.end_step(["a"])
    assert sorted(delivered) == [("api0", ["a:1", "a:2"]), ("api1", ["b:1"])]
    scheduler.put("a", "api0", "x", 1)  # a finished id may be reused


def test_blocking_take_wakes_on_put() -> None:
    scheduler, _ = make()
    threading.Timer(0.05, lambda: scheduler.put("late", "api", "x", 1)).start()
    start = time.monotonic()
    assert [rid for _, rid, _ in scheduler.take(4, block_s=5)] == ["late"]
    assert time.monotonic() - start < 2
