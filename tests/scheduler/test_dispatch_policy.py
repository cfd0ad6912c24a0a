from __future__ import annotations

import random
from collections import Counter

import pytest

from scheduler.dispatch_policy import NoRankAvailable, RankLoad, dispatch, transfer_protocol


def rank(rank_id: str, role: str, host: str = "h1", protocols=("ipc", "tcp"), **load) -> RankLoad:
    load.setdefault("num_free_blocks", 1000)
    load.setdefault("num_blocks", 1000)
    return RankLoad(rank_id, role, host, tuple(protocols), **load)


def test_least_loaded_prefill_and_decode_win():
    snapshot = [
        rank("p0", "prefill", num_queued_prompt_tokens=5000),
        rank("p1", "prefill", num_queued_prompt_tokens=100),
        rank("d0", "decode", num_running=40),
        rank("d1", "decode", num_running=3),
    ]
    picked = dispatch(snapshot, 50, random.Random(0))
    assert (picked.prefill.rank_id, picked.decode.rank_id) == ("p1", "d1")
    assert picked.protocol == "ipc" and picked.is_disaggregated


def test_a_mixed_rank_runs_the_whole_request():
    picked = dispatch([rank("m0", "mixed")], 10, random.Random(0))
    assert picked.prefill is picked.decode and picked.protocol is None
    assert not picked.is_disaggregated
    busy_prefill = rank("p0", "prefill", num_queued_prompt_tokens=9000)
    picked = dispatch(
        [busy_prefill, rank("m0", "mixed"), rank("d0", "decode")], 10, random.Random(0)
    )
    assert picked.prefill.rank_id == "m0" and picked.decode.rank_id == "m0"


def test_protocol_choice_follows_hosts_and_offers():
    p = rank("p", "prefill", host="a", protocols=("rdma", "ipc", "tcp"))
    assert transfer_protocol(p, rank("d", "decode", host="a", protocols=("ipc", "tcp"))) == "ipc"
    assert transfer_protocol(p, rank("d", "decode", host="b", protocols=("ipc", "rdma"))) == "rdma"
    assert transfer_protocol(p, rank("d", "decode", host="b", protocols=("ipc", "tcp"))) == "tcp"
    assert transfer_protocol(p, rank("d", "decode", host="b", protocols=("ipc",))) is None


def test_incompatible_decode_ranks_are_skipped():
    snapshot = [
        rank("p0", "prefill", host="a", protocols=("rdma",)),
        rank("d_idle", "decode", host="b", protocols=("tcp",)),
        rank("d_busy", "decode", host="c", protocols=("rdma",), num_running=50),
    ]
    picked = dispatch(snapshot, 10, random.Random(0))
    assert picked.decode.rank_id == "d_busy" and picked.protocol == "rdma"


def test_an_incompatible_prefill_rank_falls_back_to_another():
    snapshot = [
        rank("p_idle", "prefill", host="a", protocols=("ipc",)),
        rank("p_busy", "prefill", host="b", protocols=("tcp",), num_queued_prompt_tokens=900),
        rank("d0", "decode", host="c", protocols=("tcp",)),
    ]
    assert dispatch(snapshot, 10, random.Random(0)).prefill.rank_id == "p_busy"


def test_missing_roles_and_protocols_are_clear_errors():
    with pytest.raises(NoRankAvailable, match="no live prefill"):
        dispatch([rank("d0", "decode")], 10, random.Random(0))
    with pytest.raises(NoRankAvailable, match="no live decode"):
        dispatch([rank("p0", "prefill")], 10, random.Random(0))
    snapshot = [
        rank("p0", "prefill", host="a", protocols=("rdma",)),
        rank("d0", "decode", host="b", protocols=("tcp",)),
    ]
    with pytest.raises(
        NoRankAvailable, match=r"prefill offers \['rdma'\].*decode offers \['tcp'\]"
    ):
        dispatch(snapshot, 10, random.Random(0))
    with pytest.raises(ValueError, match="role"):
        rank("x", "router")


def test_a_decode_rank_without_room_is_avoided():
    snapshot = [
        rank("p0", "prefill"),
        rank("d_full", "decode", num_running=0, num_free_blocks=1, block_size=16),
        rank("d_roomy", "decode", num_running=30),
    ]
    assert dispatch(snapshot, 100, random.Random(0)).decode.rank_id == "d_roomy"


def test_skewed_load_spreads_uniformly_over_near_equals_only():
    # Two idle decode ranks, one within the tolerance of them, five clearly busier.
    loads = {"d0": 0, "d1": 0, "d2": 0.5, "d3": 4, "d4": 8, "d5": 16, "d6": 32, "d7": 64}
    snapshot = [rank("p0", "prefill")] + [
        rank(rank_id, "decode", num_running=int(load), num_free_blocks=1000 - int(load * 10))
        for rank_id, load in loads.items()
    ]
    rng = random.Random(1234)
    counts = Counter(dispatch(snapshot, 10, rng).decode.rank_id for _ in range(10_000))
    assert set(counts) == {"d0", "d1", "d2"}  # the busy ranks never get a request
    expected = 10_000 / 3
    chi_square = sum((counts[r] - expected) ** 2 / expected for r in ("d0", "d1", "d2"))
    assert chi_square < 13.8  # p = 0.001 for 2 degrees of freedom


def test_many_prefill_ranks_at_equal_load_share_requests():
    snapshot = [rank(f"p{i}", "prefill", num_queued_prompt_tokens=1000 + i) for i in range(8)]
    snapshot.append(rank("d0", "decode"))
    rng = random.Random(7)
    counts = Counter(dispatch(snapshot, 10, rng).prefill.rank_id for _ in range(8_000))
    assert len(counts) == 8 and min(counts.values()) > 800  # ~1000 each


def test_protocol_choice_says_why() -> None:
    from scheduler.dispatch_policy import explain_protocol

    p = RankLoad("p0", "prefill", "host-a", ("rdma", "ipc", "tcp"))
    assert explain_protocol(p, RankLoad("d0", "decode", "host-a", ("ipc", "tcp"))) == (
        "ipc", "both ranks on host host-a",
    )  # fmt: skip
    assert explain_protocol(p, RankLoad("d1", "decode", "host-b", ("rdma", "tcp"))) == (
        "rdma", "different hosts; both offer rdma",
    )  # fmt: skip
    protocol, why = explain_protocol(p, RankLoad("d2", "decode", "host-a", ("tcp",)))
    assert (
        protocol == "tcp"
        and why == "one host, but ipc is not offered by both; rdma not offered by both"
    )
    protocol, why = explain_protocol(p, RankLoad("d3", "decode", "host-b", ("foo",)))
    assert protocol is None and "decode d3 offers ['foo']" in why
