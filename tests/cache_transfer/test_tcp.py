"""tcp backend behaviour in one process (two-process transfers: test_transfer_processes.py)."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import torch

from cache_transfer import tcp
from cache_transfer.regions import all_regions, dst_block_ranges
from tests.cache_transfer.kv_cluster import layout

TID = bytes(range(16))  # a transfer id


def test_an_idle_tcp_stream_survives_its_socket_timeout(monkeypatch) -> None:
    monkeypatch.setattr(tcp, "SOCKET_TIMEOUT_S", 0.2)
    src_layout, dst_layout = layout(8), layout(8)
    src = torch.randn(src_layout.shape).to(src_layout.dtype)
    dst = torch.zeros(dst_layout.shape, dtype=dst_layout.dtype)
    receiver = tcp.TcpTransferEngine(dst, dst_layout)
    sender = tcp.TcpTransferEngine(src, src_layout, listen=False, num_streams=2)
    try:
        sender.connect("d0", receiver.endpoint())
        receiver.allow(b"1" * 16, dst_block_ranges(dst_layout, [0, 1]))
        sender.write("d0", b"1" * 16, all_regions(src_layout, dst_layout, [2, 3], [0, 1])).wait(5)
        time.sleep(0.7)  # several socket timeouts with nothing pending
        sender.write("d0", b"1" * 16, all_regions(src_layout, dst_layout, [4, 5], [0, 1])).wait(5)
        assert torch.equal(dst[:, :, [0, 1]], src[:, :, [4, 5]])
    finally:
        sender.close()
        receiver.close()


def test_scatter_reads_fill_every_view_whatever_the_pieces_arrive_in() -> None:
    rng = random.Random(5)
    sizes = [rng.randint(1, 300) for _ in range(500)]  # more views than one call takes
    payload = bytes(rng.getrandbits(8) for _ in range(sum(sizes)))
    landing = bytearray(sum(sizes) + 7)
    views, at = [], 3
    for size in sizes:
        views.append(memoryview(landing)[at : at + size])
        at += size
    a, b = socket.socketpair()
    with a, b:

        def send_in_odd_pieces() -> None:
            for start in range(0, len(payload), 997):
                a.sendall(payload[start : start + 997])
                time.sleep(0.0005)

        sender = threading.Thread(target=send_in_odd_pieces)
        sender.start()
        tcp.recv_into_all(b, views)
        sender.join()
    assert bytes(landing[3 : 3 + len(payload)]) == payload
    assert landing[:3] == b"\0\0\0" and landing[-4:] == b"\0\0\0\0"


def test_writes_at_overflowing_offsets_are_refused_and_land_nothing() -> None:
    """Issue 17: a DATA frame at offset 2**63 - 1000 passed the range check (64-bit
    overflow of offset + size); a DATAV table of huge sizes could wrap to its total."""
    dst_layout = layout(8)
    dst = torch.zeros(dst_layout.shape, dtype=dst_layout.dtype)
    receiver = tcp.TcpTransferEngine(dst, dst_layout)
    receiver.allow(TID, dst_block_ranges(dst_layout, [0, 1]))
    endpoint = receiver.endpoint()
    try:
        with socket.create_connection((endpoint["host"], endpoint["port"]), timeout=5) as sock:
            for offset in (2**63 - 1000, 2**64 - 8, 2**63):
                frame = tcp.HEADER.pack(tcp.MAGIC, tcp.DATA, TID, offset, 4096)
                sock.sendall(frame + b"\xff" * 4096)
                sock.sendall(tcp.HEADER.pack(tcp.MAGIC, tcp.SYNC, TID, 1, 0))
                reply = bytearray(tcp.HEADER.size)
                tcp.recv_exact(sock, memoryview(reply))
                _, kind, _, _, nbytes = tcp.HEADER.unpack(reply)
                reason = bytearray(nbytes)
                tcp.recv_exact(sock, memoryview(reason))
                assert kind == tcp.NACK and b"outside" in reason, (offset, bytes(reason))
        with socket.create_connection((endpoint["host"], endpoint["port"]), timeout=5) as sock:
            table = struct.pack("<qQqQ", 0, 2**62, 0, 2**62 * 3)  # sums to 0 mod 2**64
            sock.sendall(tcp.HEADER.pack(tcp.MAGIC, tcp.DATAV, TID, 2, 0) + table)
            assert sock.recv(1) == b"", "the receiver closed the stream"
        assert not dst.any(), "nothing landed"
        assert receiver.check_allowed(TID, 2**63 - 1000, 4096) is not None
        assert receiver.check_allowed(TID, 0, 2**63 - 1) is not None
        assert receiver.check_allowed(TID, -4096, 4096) is not None
        assert receiver.check_allowed(TID, 0, 16) is None
    finally:
        receiver.close()
