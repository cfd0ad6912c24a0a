"""What the CUDA ipc pull path does without a GPU: its frames and region encoding, and
the receiver's range check every PULL passes (tcp frames pass the same one)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from cache_transfer import ipc_pull
from cache_transfer.ipc_pull import HEADER, PULL, read_frame, send_frame
from cache_transfer.regions import Regions
from cache_transfer.tcp import TcpTransferEngine
from tests.cache_transfer.kv_cluster import layout


def test_regions_survive_the_wire() -> None:
    offsets = np.array([0, 4096, 1 << 40]), np.array([8192, 0, 12])
    regions = Regions(*offsets, np.array([16, 4096, 1]))
    back = ipc_pull.decode_regions(ipc_pull.encode_regions(regions))
    for field in ("src_offset", "dst_offset", "nbytes"):
        assert getattr(back, field).tolist() == getattr(regions, field).tolist()
    with pytest.raises(ValueError, match="not whole regions"):
        ipc_pull.decode_regions(b"\0" * 30)


def test_frames_round_trip_and_foreign_streams_are_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, PULL, seq=7, transfer_id=b"T" * 16, payload=b"abc", slot=63)
        assert read_frame(b) == (PULL, 63, 7, b"T" * 16, b"abc")
        a.sendall(b"XXXX" + b"\0" * (HEADER.size - 4))
        with pytest.raises(ConnectionError, match="not a pd-serve ipc stream"):
            read_frame(b)
        a.sendall(HEADER.pack(b"PDIP", PULL, 0, 1, b"\1" * 16, 100) + b"short")
        a.close()
        with pytest.raises(ConnectionError, match="peer closed"):
            read_frame(b)


def test_range_check_accepts_exactly_the_open_ranges() -> None:
    lay = layout(8)
    engine = TcpTransferEngine(torch.zeros(lay.shape, dtype=lay.dtype), lay, listen=False)
    try:
        engine.allow(b"5" * 16, [(1000, 2000), (0, 100), (4096, 8192)])

        def check(offsets: list[int], sizes: list[int], transfer_id: bytes = b"5" * 16):  # type: ignore[no-untyped-def]
            return engine.check_allowed_regions(transfer_id, np.array(offsets), np.array(sizes))

        assert check([0, 1000, 1500, 4096, 8191], [100, 1000, 500, 4096, 1]) is None
        assert "[1999, 2001)" in check([0, 1999], [10, 2])  # straddles a range's end
        assert "[100, 101)" in check([100], [1])  # between ranges
        assert "[-8, 0)" in check([-8], [8])  # before the first
        assert "[1000, 1000)" in check([1000], [0])  # empty writes are not writes
        assert "not open" in check([0], [1], transfer_id=b"6" * 16)
        engine.revoke(b"5" * 16)
        assert "not open" in check([0], [1])
        engine.allow(b"7" * 16, [])  # a transfer with no blocks takes no bytes
        assert "[0, 1)" in check([0], [1], transfer_id=b"7" * 16)
    finally:
        engine.close()
