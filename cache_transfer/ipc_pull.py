"""ipc on CUDA: the receiving rank pulls what the sending rank offers.

A copy engine writing *into* memory that a process opened through CUDA IPC crawls
(~38 GB/s between two H200s over NVLink, 2026-11-22), while copies into a process's
own memory run at the raw peer-copy rate (~392 GB/s) even when they read IPC-opened
memory. So on CUDA the receiver moves the bytes: a sender opens a channel to the
receiver's pull service once per peer and hands over its own pool's CUDA IPC handle;
each write becomes a PULL that the receiver checks against the blocks open for the
transfer (a stray write is refused, not landed), copies from the opened pool into its
own (cuda_copy) on streams of its own, and acknowledges once the bytes have landed.
The receiver maps the sender's pool into its *own* device (a peer mapping), so every
copy runs on the receiver's GPU, in its own context: the sender's GPU runs nothing of
ours and holds no context of ours. (Run from a second context on the sender's GPU, a
1-block pull took ~100 us to complete, time-sliced against the sender's context; from
our own, 12 us.) It also means the ranks need not agree on device numbers: a decode
rank that sees only its own GPU (CUDA_VISIBLE_DEVICES) still opens the pool. Where
the GPUs cannot map each other's memory, the pool is opened on its own device instead,
by the sender's device index, and copies cross through a landing stream.
Ordering without waiting: the sender records an interprocess CUDA event on the stream
that produces the bytes and names it in the PULL; the receiver's copy stream waits on
that event, so the copy starts the moment the bytes exist and no thread of either side
ever waits for the sender's compute. A sender reuses its events round robin: waiting
on a later record of the same event only waits longer, never too little.
Cost: each write is one local round trip (~0.25 ms on the H200 pair for one block,
half of it queueing the copy from Python), which layer-by-layer writes hide behind
the following layers' compute, and which back-to-back writes overlap with each
other's copies.

Wire: a Unix socket in the abstract namespace, one connection per sender.

    header  <4sBB2xQ16sQ : magic, kind, event slot, seq, transfer id, payload bytes
    HELLO   ->  msgpack {"handle": the sender pool's torch _share_cuda_ fields, "nbytes",
                         "events": the IPC handles of its events}
    PULL    ->  regions: src offsets, dst offsets, lengths (int64 arrays, back to back);
                the slot names the event that marks them produced
    ACK     <-  seq: its bytes have landed (for HELLO: the pool is open)
    NACK    <-  seq + reason (utf-8): refused (nothing landed) or the copy failed
Replies come in request order.
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import socket
import struct
import threading
import uuid
from typing import TYPE_CHECKING

import msgpack
import numpy as np
import torch

from cache_transfer.auth import (
    SESSION_BYTES,
    challenge,
    check_same_user,
    respond,
)
from cache_transfer.cuda_copy import copy_regions
from cache_transfer.regions import Regions
from cache_transfer.tcp import recv_exact
from cache_transfer.transfer_engine import TransferError, TransferHandle

if TYPE_CHECKING:
    from cache_transfer.transfer_engine import TransferEngine


HEADER = struct.Struct("<4sBB2xQ16sQ")
NO_TRANSFER = bytes(16)  # HELLO and replies name no transfer
MAGIC = b"PDIP"
HELLO, PULL, ACK, NACK = 1, 2, 3, 4
HELLO_TIMEOUT_S = 10.0
EVENT_SLOTS = 64

AUTH_PURPOSE = "kv-ipc-pull"


def send_frame(sock: socket.socket, kind: int, seq: int, transfer_id: bytes, payload: bytes,
               slot: int = 0) -> None:  # fmt: skip
    sock.sendall(HEADER.pack(MAGIC, kind, slot, seq, transfer_id, len(payload)) + payload)


def read_frame(sock: socket.socket) -> tuple[int, int, int, int, bytes]:
    """(kind, slot, seq, transfer id, payload); ConnectionError on a closed or foreign
    stream."""
    header = bytearray(HEADER.size)
    recv_exact(sock, memoryview(header))
    magic, kind, slot, seq, transfer_id, size = HEADER.unpack(header)
    if magic != MAGIC:
        raise ConnectionError(f"not a pd-serve ipc stream (magic {magic!r})")
    payload = bytearray(size)
    recv_exact(sock, memoryview(payload))
    return kind, slot, seq, transfer_id, bytes(payload)


def encode_regions(regions: Regions) -> bytes:
    return b"".join(a.astype(np.int64).tobytes() for a in (
        regions.src_offset, regions.dst_offset, regions.nbytes))  # fmt: skip


def decode_regions(payload: bytes) -> Regions:
    if len(payload) % 24:
        raise ValueError(f"a PULL payload of {len(payload)} bytes is not whole regions")
    table = np.frombuffer(payload, dtype=np.int64).reshape(3, -1)
    return Regions(table[0], table[1], table[2])


def open_shared_pool(handle: list, nbytes: int, device: torch.device) -> torch.Tensor:
    """A peer's pool, opened from its CUDA IPC handle as flat uint8 and mapped into
    ``device``'s context. On another GPU than the pool's own that is a peer mapping
    (peer access is enabled as needed): this device's copy engine and kernels then
    read the pool over the link, and the pool's GPU needs no context of ours at all."""
    storage = torch.UntypedStorage._new_shared_cuda(device.index, *handle[1:])
    if storage.nbytes() < nbytes:
        raise ValueError(f"the shared pool has {storage.nbytes()} bytes, not {nbytes}")
    flat = torch.empty(0, dtype=torch.uint8, device=device)
    return flat.set_(storage, 0, (nbytes,), (1,))


def share_pool(flat: torch.Tensor, events: list[torch.cuda.Event]) -> dict:
    """What a receiver needs to open ``flat`` and wait on ``events`` (HELLO's payload)."""
    return {"handle": list(flat.untyped_storage()._share_cuda_()), "nbytes": flat.numel(),
            "events": [event.ipc_handle() for event in events]}  # fmt: skip


class _Streams:
    """One channel's copy streams. With the sender's pool mapped into our device (the
    usual case) that is one stream there. Opened on its own device instead: one on the
    source device (copies run there) and two on ours (a cross-device copy is ordered
    with our current stream, so that is a stream of ours, never the engine's compute
    stream; the pipeline lands chunks on the other)."""

    def __init__(self, src: torch.device, dst: torch.device):
        self.src = torch.cuda.Stream(src)
        self.dst = self.src if src == dst else torch.cuda.Stream(dst)
        self.landing = None if src == dst else torch.cuda.Stream(dst)

    def make_current(self) -> None:
        """Make these the calling thread's current device and streams (both are
        per-thread, so one channel's thread sets them once; 25 us per pull otherwise)."""
        torch.cuda.set_device(self.src.device)
        torch.cuda.set_stream(self.dst)
        torch.cuda.set_stream(self.src)

    def record(self) -> list[torch.cuda.Event]:
        """Events that complete when everything queued so far has."""
        events = []
        for stream in {self.src, self.dst}:
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
        return events


class PullService:
    """The receiving side: serves channels, pulling into ``engine``'s pool."""

    def __init__(self, engine: TransferEngine, flat: torch.Tensor, secret: bytes | None = None):
        self.engine = engine
        self.flat = flat
        self.secret = secret
        self.name = f"pd-kv-pull-{uuid.uuid4().hex}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind("\0" + self.name)
        self._listener.listen()
        self._lock = threading.Lock()  # a PULL's check and queueing vs. quiesce
        # transfer id -> channel -> the events of its latest pull (a channel's pulls run
        # in order on its streams, so the latest covers the earlier ones)
        self._in_flight: dict[bytes, dict[int, list[torch.cuda.Event]]] = {}
        self._connections: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="ipc-pull-accept", daemon=True).start()

    def quiesce(self, transfer_id: bytes) -> None:
        """Wait until the copies queued for ``transfer_id`` have landed. Called after the
        transfer is revoked, so no new copy of it can be queued (the check and the
        queueing happen under one lock)."""
        with self._lock:
            latest = self._in_flight.pop(transfer_id, {})
        for events in latest.values():
            for event in events:
                event.synchronize()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="ipc-pull", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        replies: queue.Queue = queue.Queue()
        replier = threading.Thread(target=self._reply, args=(conn, replies), daemon=True)
        replier.start()
        src = None  # the sender's pool; outlives every copy from it (replier joined below)
        try:
            conn.settimeout(HELLO_TIMEOUT_S)
            check_same_user(conn)
            if self.secret is not None:
                challenge(conn, self.secret, AUTH_PURPOSE)
            kind, _, seq, _, payload = read_frame(conn)
            conn.settimeout(None)
            if kind != HELLO:
                raise ConnectionError(f"expected HELLO, got frame kind {kind}")
            try:
                hello = msgpack.unpackb(payload)
                src = self._open(hello["handle"], hello["nbytes"])
                produced = [torch.cuda.Event.from_ipc_handle(self.flat.device, h)
                            for h in hello["events"]]  # fmt: skip
                streams = _Streams(src.device, self.flat.device)
                streams.make_current()
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                replies.put((seq, f"cannot open the sender's KV pool: {e}", []))
                return
            replies.put((seq, None, []))
            while True:
                kind, slot, seq, transfer_id, payload = read_frame(conn)
                if slot >= len(produced):
                    replies.put((seq, f"no event in slot {slot}", []))
                    continue
                streams.src.wait_event(produced[slot])
                reply = (seq, *self._pull(src, streams, transfer_id, payload))
                if replies.unfinished_tasks or _readable(conn):
                    replies.put(reply)  # more is coming: keep reading while these land
                else:
                    self._answer(conn, *reply)  # nothing else to do: answer it here
        except (ConnectionError, OSError):
            pass  # the sender went away; what it queued still lands before src is dropped
        finally:
            replies.put(None)
            replier.join()
            self._connections.discard(conn)
            conn.close()

    def _open(self, handle: list, nbytes: int) -> torch.Tensor:
        """The sender's pool, mapped into our device where the link allows, so copies
        pull on our GPU; else opened on its own device (the same index in both
        processes), from where the copies cross through our landing stream."""
        try:
            return open_shared_pool(handle, nbytes, self.flat.device)
        except RuntimeError:  # no peer access between the two GPUs
            return open_shared_pool(handle, nbytes, torch.device("cuda", handle[0]))

    def _pull(self, src: torch.Tensor, streams: _Streams, transfer_id: bytes,
              payload: bytes) -> tuple[str | None, list[torch.cuda.Event]]:  # fmt: skip
        try:
            regions = decode_regions(payload)
        except ValueError as e:
            return str(e), []
        src_offset, nbytes = regions.src_offset, regions.nbytes
        # Overflow-safe: sizes against the room left, never offset + size.
        room = src.numel() - src_offset
        if len(regions) and ((src_offset < 0).any() or (nbytes < 0).any() or (nbytes > room).any()):
            return "source bytes outside the sender's pool", []
        with self._lock:
            why = self.engine.check_allowed_regions(transfer_id, regions.dst_offset, regions.nbytes)
            if why is not None:
                return why, []
            try:
                copy_regions(src, self.flat, regions, self.engine.layout.block_bytes,
                             streams.landing)  # fmt: skip
                events = streams.record()
            except (RuntimeError, ValueError) as e:
                return f"copy failed: {e}", []
            self._in_flight.setdefault(transfer_id, {})[id(streams)] = events
        return None, events

    def _reply(self, conn: socket.socket, replies: queue.Queue) -> None:
        while (reply := replies.get()) is not None:
            self._answer(conn, *reply)
            replies.task_done()

    @staticmethod
    def _answer(conn: socket.socket, seq: int, error: str | None,
                events: list[torch.cuda.Event]) -> None:  # fmt: skip
        """Reply once the copies have landed (in request order: the caller answers
        inline only when nothing is queued before it)."""
        for event in events:
            event.synchronize()
        with contextlib.suppress(OSError):  # a gone sender needs no answer
            if error is None:
                send_frame(conn, ACK, seq, NO_TRANSFER, b"")
            else:
                send_frame(conn, NACK, seq, NO_TRANSFER, error.encode())


def _readable(sock: socket.socket) -> bool:
    """Whether a frame (or the end of the stream) is already waiting."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    return True


class PullChannel:
    """The sending side's channel to one receiver's pull service."""

    def __init__(self, peer_id: str, name: str, flat: torch.Tensor, secret: bytes | None = None):
        self.peer_id = peer_id
        with torch.cuda.device(flat.device):  # the events belong to the pool's device
            self._events = [torch.cuda.Event(interprocess=True) for _ in range(EVENT_SLOTS)]
            hello = msgpack.packb(share_pool(flat, self._events))
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(HELLO_TIMEOUT_S)
        try:
            self._sock.connect("\0" + name)
            if secret is not None:
                respond(self._sock, secret, AUTH_PURPOSE, secrets.token_bytes(SESSION_BYTES))
            send_frame(self._sock, HELLO, 0, NO_TRANSFER, hello)
            kind, _, _, _, reason = read_frame(self._sock)
        except (OSError, ConnectionError) as e:
            self._sock.close()
            raise TransferError(f"cannot reach {peer_id}'s ipc pull service: {e}") from e
        if kind != ACK:
            self._sock.close()
            raise TransferError(f"{peer_id} refused the ipc channel: {reason.decode()}")
        self._sock.settimeout(None)
        self._lock = threading.Lock()  # seq, slots, pending and the socket's send side
        self._seq = 0
        self._pending: dict[int, TransferHandle] = {}
        self._broken: str | None = None
        threading.Thread(target=self._receive, name="ipc-pull-ack", daemon=True).start()

    def pull(
        self, transfer_id: bytes, regions: Regions, stream: torch.cuda.Stream
    ) -> TransferHandle:
        """Ask the receiver to pull ``regions`` once the work queued so far on
        ``stream`` (which produces them) is done."""
        handle = TransferHandle(f"ipc write {transfer_id.hex()[:8]} to {self.peer_id}")
        payload = encode_regions(regions)
        with self._lock:
            if self._broken is not None:
                handle.fail(TransferError(self._broken))
                return handle
            self._seq += 1
            slot = self._seq % len(self._events)
            self._events[slot].record(stream)
            self._pending[self._seq] = handle
            try:
                send_frame(self._sock, PULL, self._seq, transfer_id, payload, slot)
            except OSError as e:
                self._broken = f"lost the ipc channel to {self.peer_id}: {e}"
        if self._broken is not None:
            self._fail_all(self._broken)
        return handle

    def close(self) -> None:
        self._fail_all(f"the ipc channel to {self.peer_id} is closed")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _receive(self) -> None:
        try:
            while True:
                kind, _, seq, _, reason = read_frame(self._sock)
                with self._lock:
                    handle = self._pending.pop(seq, None)
                if handle is None:
                    continue
                if kind == ACK:
                    handle.part_done()
                else:
                    handle.fail(TransferError(f"{self.peer_id} refused an ipc write: "
                                              f"{reason.decode()}"))  # fmt: skip
        except (ConnectionError, OSError) as e:
            self._fail_all(f"lost the ipc channel to {self.peer_id}: {e}")

    def _fail_all(self, why: str) -> None:
        with self._lock:
            self._broken = self._broken or why
            pending, self._pending = self._pending, {}
        for handle in pending.values():
            handle.fail(TransferError(why))
