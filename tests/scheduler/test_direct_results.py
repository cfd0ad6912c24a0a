"""Results without Redis: ranks push ResultBatches straight to the owning API server
(real ZMQ sockets on 127.0.0.1), and a rank's view of the requests it holds."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from proto import cluster_pb2 as pb
from scheduler.direct_rank import DirectRank
from scheduler.direct_results import ResultListener, ResultPusher, check_owner

KEY = b"k" * 32  # the MAC key the cluster secret gives result frames


def entry(request_id: str, index: int, tokens: list[int], finish: str = "") -> pb.ResultEntry:
    return pb.ResultEntry(request_id=request_id, index=index, token_ids=tokens,
                          finish_reason=finish)  # fmt: skip


class Received:
    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finished: list[str] = []
        self.lost: dict[str, str] = {}

    def sink(self, request_id: str, entries: list[pb.ResultEntry]) -> None:
        for e in entries:
            self.tokens.setdefault(request_id, []).extend(e.token_ids)
            if e.finish_reason:
                self.finished.append(request_id)

    def on_lost(self, request_id: str, why: str) -> None:
        self.lost[request_id] = why


async def until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def listener(received: Received, key: bytes | None, silence_s: float = 30.0) -> ResultListener:
    return ResultListener("127.0.0.1", "127.0.0.1", key, received.sink, received.on_lost,
                          silence_s).start()  # fmt: skip


def test_tokens_of_two_ranks_arrive_in_order_and_a_finished_request_is_let_go():
    async def run() -> None:
        received = Received()
        results = listener(received, KEY)
        prefill = ResultPusher("prefill.dp0", KEY, beat_s=60)
        decode = ResultPusher("decode.dp0", KEY, beat_s=60)
        try:
            results.expect("r1")
            decode.add(results.address, entry("r1", 1, [11, 12]))
            decode.flush(dict)
            decode.add(results.address, entry("r1", 3, [13], "length"))
            decode.flush(dict)
            await asyncio.sleep(0.2)
            assert received.tokens == {}  # held back until the first token comes
            prefill.add(results.address, entry("r1", 0, [10]))
            prefill.flush(dict)
            await until(lambda: received.finished == ["r1"])
            assert received.tokens == {"r1": [10, 11, 12, 13]}
            assert results.num_expected == 0
        finally:
            prefill.close()
            decode.close()
            await results.close()

    asyncio.run(run())


def test_frames_without_the_secrets_mac_or_malformed_are_dropped():
    async def run() -> None:
        received = Received()
        results = listener(received, KEY)
        forger = ResultPusher("forger", b"x" * 32, beat_s=60)
        context = zmq.Context()
        raw = context.socket(zmq.PUSH)
        raw.connect(results.address)
        try:
            results.expect("r1")
            forger.add(results.address, entry("r1", 0, [1], "stop"))
            forger.flush(dict)
            raw.send_multipart([b"garbage"])
            await until(lambda: results.num_unauthenticated == 1 and results.num_malformed == 2)
            assert received.tokens == {} and results.num_expected == 1
        finally:
            raw.close(linger=0)
            context.term()
            forger.close()
            await results.close()

    asyncio.run(run())


def test_a_request_its_rank_keeps_naming_lives_and_one_nobody_names_is_lost():
    async def run() -> None:
        received = Received()
        results = listener(received, None, silence_s=0.6)
        decode = ResultPusher("decode.dp0", None, beat_s=0.1)
        try:
            results.expect("kept")
            results.expect("dropped")
            decode.add(results.address, entry("kept", 0, [5]))
            decode.flush(lambda: {results.address: ["kept"]})
            for _ in range(15):  # 1.5 s: past the bound for "dropped" only
                await asyncio.sleep(0.1)
                decode.flush(lambda: {results.address: ["kept"]})
            assert list(received.lost) == ["dropped"]
            assert "stopped answering" in received.lost["dropped"]
            await until(lambda: "kept" in received.lost, timeout=3)  # beats stopped
            assert received.lost["kept"].startswith("decode.dp0 stopped answering")
        finally:
            decode.close()
            await results.close()

    asyncio.run(run())


def test_a_sink_that_fails_costs_its_request_only():
    async def run() -> None:
        received = Received()

        def sink(request_id: str, entries: list[pb.ResultEntry]) -> None:
            if request_id == "bad":
                raise RuntimeError("boom")
            received.sink(request_id, entries)

        results = ResultListener("127.0.0.1", "127.0.0.1", None, sink, received.on_lost, 30.0)
        results.start()
        rank = ResultPusher("decode.dp0", None, beat_s=60)
        try:
            for request_id in ("bad", "good"):
                results.expect(request_id)
                rank.add(results.address, entry(request_id, 0, [1], "stop"))
            rank.flush(dict)
            await until(lambda: received.finished == ["good"])
            assert "could not be delivered: boom" in received.lost["bad"]
        finally:
            rank.close()
            await results.close()

    asyncio.run(run())


def test_an_owner_nobody_can_reach_never_stops_the_rank():
    rank = ResultPusher("decode.dp0", None, beat_s=60)
    try:
        rank.add("tcp://no-such-host.invalid:1", entry("r", 0, [1]))
        rank.flush(dict)  # queued for a peer that never comes, or dropped: never raised
    finally:
        rank.close()


def paired(request_id: str, owner: str = "tcp://127.0.0.1:5555") -> pb.DispatchedRequest:
    return pb.DispatchedRequest(request_id=request_id, owner=owner, prompt_token_ids=[1, 2],
                                prefill_rank_id="p.dp0", decode_rank_id="d.dp0")  # fmt: skip


def test_a_direct_rank_queues_refuses_duplicates_and_routes_aborts():
    rank = DirectRank("p.dp0", None, beat_s=60, owner_timeout_s=600)
    try:
        for request_id in ("a", "b", "c"):
            rank.submit(paired(request_id))
        with pytest.raises(ValueError, match="already in use"):
            rank.submit(paired("a"))
        with pytest.raises(ValueError, match="result address"):
            rank.submit(paired("d", owner="api-1"))
        assert [r.request_id for r in rank.take(1)] == ["a"]
        rank.abort("b")  # still queued: dropped here, the loop never sees it
        rank.abort("a")  # taken: the loop stops it
        rank.abort("late")  # not here yet: its Commit will be refused
        assert rank.take_aborts() == ["a"] and rank.take_aborts() == []
        assert rank.was_aborted("late") and not rank.was_aborted("a")
        assert [r.request_id for r in rank.take(5)] == ["c"]
        assert rank.num_queued == 0
    finally:
        rank.close()


def test_requests_of_an_owner_the_rank_cannot_reach_are_stopped():
    """A decode rank adopts requests of two owners; one listens, the other is gone (its
    API server died): only the gone one's request is aborted, after the bound."""
    context = zmq.Context()
    live = context.socket(zmq.PULL)
    port = live.bind_to_random_port("tcp://127.0.0.1")
    gone_port = live.bind_to_random_port("tcp://127.0.0.1")
    live.unbind(f"tcp://127.0.0.1:{gone_port}")  # a port nothing listens on any more
    rank = DirectRank("d.dp0", None, beat_s=0.05, owner_timeout_s=0.5)
    try:
        rank.adopt(paired("kept", owner=f"tcp://127.0.0.1:{port}"))
        rank.adopt(paired("orphan", owner=f"tcp://127.0.0.1:{gone_port}"))
        aborted: list[str] = []
        deadline = time.monotonic() + 5
        while not aborted and time.monotonic() < deadline:
            rank.end_step([])
            aborted += rank.take_aborts()
            time.sleep(0.02)
        assert aborted == ["orphan"]
        for _ in range(20):  # the loop is stopping it: asked once, not every beat
            rank.end_step([])
            time.sleep(0.02)
        assert rank.take_aborts() == []
        rank.end_step(["orphan"])
    finally:
        rank.close()
        live.close(linger=0)
        context.term()


def test_check_owner_takes_only_result_addresses():
    assert check_owner("tcp://10.0.0.5:41000") == "tcp://10.0.0.5:41000"
    assert check_owner("tcp://[::1]:41000") == "tcp://[::1]:41000"
    for bad in ("api-1", "ipc:///tmp/x", "tcp://host:1/x", "tcp://a b:1", "tcp://-:1",
                "tcp://.:1", "tcp://a:0", "tcp://a:65536"):  # fmt: skip
        with pytest.raises(ValueError):
            check_owner(bad)
