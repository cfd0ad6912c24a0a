"""tcp backend behaviour in one process (two-process transfers: test_transfer_processes.py)."""

from __future__ import annotations

import time

import torch

from cache_transfer import tcp
from cache_transfer.regions import all_regions, dst_block_ranges
from tests.cache_transfer.kv_cluster import layout


def test_an_idle_tcp_stream_survives_its_socket_timeout(monkeypatch) -> None:
    monkeypatch.setattr(tcp, "SOCKET_TIMEOUT_S", 0.2)
    src_layout, dst_layout = layout(8), layout(8)
    src = torch.randn(src_layout.shape).to(src_layout.dtype)
    dst = torch.zeros(dst_layout.shape, dtype=dst_layout.dtype)
    receiver = tcp.TcpTransferEngine(dst, dst_layout)
    sender = tcp.TcpTransferEngine(src, src_layout, listen=False, num_streams=2)
    try:
        sender.connect("d0", receiver.endpoint())
        receiver.allow(1, dst_block_ranges(dst_layout, [0, 1]))
        sender.write("d0", 1, all_regions(src_layout, dst_layout, [2, 3], [0, 1])).wait(5)
        time.sleep(0.7)  # several socket timeouts with nothing pending
        sender.write("d0", 1, all_regions(src_layout, dst_layout, [4, 5], [0, 1])).wait(5)
        assert torch.equal(dst[:, :, [0, 1]], src[:, :, [4, 5]])
    finally:
        sender.close()
        receiver.close()
