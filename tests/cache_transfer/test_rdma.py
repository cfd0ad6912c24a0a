"""The rdma backend: planning, handshake encoding and error text everywhere; the verbs
themselves only where an RDMA device exists (``-m rdma``)."""

from __future__ import annotations

import os

import pytest
import torch

from cache_transfer.rdma import rdma_available
from cache_transfer.rdma_plan import (
    MAX_HANDSHAKE_BYTES,
    decode_qp_info,
    describe_wc_status,
    encode_qp_info,
    pick_nic,
    plan_work_requests,
    windows,
)
from cache_transfer.regions import Region, all_regions
from proto import pd_comm_pb2 as pb
from tests.cache_transfer.kv_cluster import layout


def test_work_requests_cover_regions_with_selective_signalling() -> None:
    regions = [Region(0, 100, 64), Region(64, 1000, 200), Region(4096, 0, 10)]
    items = plan_work_requests(regions, 10_000, 50_000, first_wr_id=7, signal_every=2,
                               max_wr_bytes=128)  # fmt: skip
    assert [(i.local_addr, i.remote_addr, i.length) for i in items] == [
        (10_000, 50_100, 64),
        (10_064, 51_000, 128), (10_192, 51_128, 72),  # split at max_wr_bytes
        (14_096, 50_000, 10),
    ]  # fmt: skip
    assert [i.wr_id for i in items] == [7, 8, 9, 10]
    assert [i.signaled for i in items] == [False, True, False, True]
    assert plan_work_requests([], 0, 0) == []


def test_windows_end_with_a_signalled_wr_and_respect_the_cap() -> None:
    src, dst = layout(40), layout(64)
    regions = all_regions(src, dst, list(range(0, 40, 2)), list(range(20)))
    items = plan_work_requests(regions, 0, 0, signal_every=16)
    batches = windows(items, 16)
    assert [i for batch in batches for i in batch] != [] and all(b[-1].signaled for b in batches)
    assert all(len(b) <= 16 for b in batches)
    assert sum(len(b) for b in batches) == len(items) == 3 * 2 * 20  # nothing coalesced
    assert sum(i.length for i in items) == 3 * 2 * 20 * src.block_bytes


def test_qp_info_round_trips_and_garbage_is_refused() -> None:
    info = pb.RdmaQpInfo(qp_num=0x1234, lid=3, gid="fe80::1", psn=99, mtu=5, gid_index=3)
    wire = encode_qp_info(info)

    def reader(data: bytes):  # type: ignore[no-untyped-def]
        view = memoryview(data)

        def read(n: int) -> bytes:
            nonlocal view
            out, view = bytes(view[:n]), view[n:]
            return out

        return read

    assert decode_qp_info(reader(wire)) == info
    with pytest.raises(ValueError, match="not a pd-serve peer"):
        decode_qp_info(reader((MAX_HANDSHAKE_BYTES + 1).to_bytes(4, "big")))
    with pytest.raises(ValueError, match="without a QP number"):
        decode_qp_info(reader(encode_qp_info(pb.RdmaQpInfo(lid=1))))


def test_nic_choice_and_error_text() -> None:
    assert [pick_nic(i, "mlx5_0,mlx5_1, mlx5_2") for i in range(4)] == [
        "mlx5_0", "mlx5_1", "mlx5_2", "mlx5_0",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"get_rdma_nics\.sh gpu"):
        pick_nic(0, "")
    assert "unreachable" in describe_wc_status(12)
    assert "rkey" in describe_wc_status(10)
    assert describe_wc_status(99) == "work completion status 99"


def test_availability_explains_itself() -> None:
    available, why = rdma_available()
    assert isinstance(available, bool) and why
    if not available:
        assert "pyverbs" in why or "no RDMA device" in why


@pytest.mark.rdma
def test_loopback_write_lands_bit_exact() -> None:
    from cache_transfer.rdma import RdmaTransferEngine

    nic = pick_nic(0, os.environ.get("KVCACHE_RDMA_NICS") or None)
    src_layout, dst_layout = layout(40), layout(64)
    src = torch.randn(src_layout.shape).to(src_layout.dtype)
    dst = torch.zeros(dst_layout.shape, dtype=dst_layout.dtype)
    receiver = RdmaTransferEngine(dst, dst_layout, nic, host="127.0.0.1")
    sender = RdmaTransferEngine(src, src_layout, nic, listen=False)
    try:
        endpoint = receiver.endpoint() | {"host": "127.0.0.1"}
        sender.connect("d0", endpoint)
        src_blocks, dst_blocks = [3, 4, 5, 9], [10, 11, 30, 31]
        regions = all_regions(src_layout, dst_layout, src_blocks, dst_blocks)
        sender.write("d0", b"1" * 16, regions).wait(10)
        assert torch.equal(dst[:, :, dst_blocks], src[:, :, src_blocks])
    finally:
        sender.close()
        receiver.close()
