"""The DP group (``engine/data_parallel.py``): ranks meet at DP rank 0's store, and a
rank whose peers do not come fails within the join timeout, naming them."""

from __future__ import annotations

import datetime
import socket
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


def join_two_ranks(model_dir, port: int) -> dict[int, object]:  # type: ignore[no-untyped-def]
    """DP ranks 0 and 1 join at ``port`` at once (one thread each); rank -> its group."""
    groups: dict[int, object] = {}

    def join(rank: int) -> None:
        groups[rank] = join_data_parallel_group(config(model_dir, rank, port), SHORT * 10)

    threads = [threading.Thread(target=join, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return groups


def test_two_ranks_meet(tiny_model):
    groups = join_two_ranks(tiny_model(), pick_free_port())
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


def test_rank_0_hosts_the_group_on_the_dp_address_only(tiny_model):
    """DESIGN: internal ports bind the address peers use (TCPStore alone binds every
    interface). Rank 0 at 127.0.0.1: nothing answers on this host's other addresses."""
    port = pick_free_port()
    outward = _outward_address()
    if outward is None:
        pytest.skip("this host has no address but loopback")
    groups = join_two_ranks(tiny_model(), port)
    assert len(groups) == 2
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the store listens here...
    with pytest.raises(OSError), socket.create_connection((outward, port), timeout=5):
        pass  # ...and not on the host's other address


def test_rank_0_that_cannot_bind_says_so(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DataParallelJoinError, match=rf"DP rank 0 cannot host DP group at "
                           rf"127.0.0.1:{port}"):  # fmt: skip
            join_data_parallel_group(config(tiny_model(), 0, port), SHORT)


def _outward_address() -> str | None:
    """This host's address on its default route (a UDP connect sends nothing), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # TEST-NET-2: only the route is looked up
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address
