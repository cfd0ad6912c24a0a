"""The DP group (``engine/data_parallel.py``): ranks meet at DP rank 0's store, and a
rank whose peers do not come fails within the join timeout, naming them."""

from __future__ import annotations

import datetime
import threading

import pytest

from engine.config import DataParallelConfig, make_engine_config
from engine.data_parallel import DataParallelJoinError, join_data_parallel_group
from pd.args import pick_free_port

SHORT = datetime.timedelta(seconds=2)


def config(model_dir, rank: int, port: int):  # type: ignore[no-untyped-def]
    data_parallel = DataParallelConfig(rank=rank, size=2, master_port=port)
    return make_engine_config(
        str(model_dir), dtype="float32", device="cpu", max_model_len=64,
        data_parallel=data_parallel,
    )  # fmt: skip


def test_two_ranks_meet(tiny_model):
    model_dir, port = tiny_model(), pick_free_port()
    groups: dict[int, object] = {}

    def join(rank: int) -> None:
        groups[rank] = join_data_parallel_group(config(model_dir, rank, port), SHORT * 10)

    threads = [threading.Thread(target=join, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted((g.rank, g.size) for g in groups.values()) == [(0, 2), (1, 2)]


def test_rank_0_alone_fails_within_the_timeout_naming_the_missing_rank(tiny_model):
    """Not gloo's rendezvous, which waits its collective timeout (10 minutes) in silence."""
    port = pick_free_port()
    with pytest.raises(DataParallelJoinError, match=r"DP rank\(s\) 1 of 2 did not join"):
        join_data_parallel_group(config(tiny_model(), 0, port), SHORT)


def test_a_rank_without_rank_0_says_where_it_looked(tiny_model):
    port = pick_free_port()
    with pytest.raises(DataParallelJoinError, match=rf"DP rank 1 found no DP group at "
                       rf"127.0.0.1:{port}"):  # fmt: skip
        join_data_parallel_group(config(tiny_model(), 1, port), SHORT)
