"""The tcp backend: any two hosts.

Sender: ``num_streams`` sockets per peer, each with a writer thread (frames out) and
a reader thread (acknowledgements in). A write is cut into chunks of at most
``chunk_bytes`` (regions are already coalesced runs of blocks, so there is no
per-block round trip), spread over the streams by bytes, and closed on each stream
it used by a SYNC frame; it completes when every such stream has acknowledged it.
Host pools send many chunks per frame (DATAV: a table of destinations, then the
payloads back to back), so small scattered blocks cost no per-block header or check.
With a cluster secret, each stream starts with a challenge-response (auth.py) that also
names the sending engine's session; the first stream to write into a transfer binds it
to that session, and frames of the transfer from any other session are refused.
Receiver: one thread per incoming stream reads each frame's payload straight into
the pool (``recvmsg_into`` fills many destinations per system call) after checking
that the ranges are open for the frame's transfer id (DATA, one chunk per frame, goes
the same way); a refused frame is drained and the transfer's next SYNC is
answered with NACK and the reason.

    frame header  <4s B 3x 16s Q Q : magic, kind, transfer id, offset|seq|count, nbytes
    DATAV table   count x <Q Q   : destination offset, bytes (then the payloads)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import secrets
import socket
import struct
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cache_transfer.auth import SESSION_BYTES, AuthError, challenge, respond
from cache_transfer.pool_bytes import Staging, host_view
from cache_transfer.regions import Region, Regions
from cache_transfer.transfer_engine import TransferEngine, TransferError, TransferHandle
from engine.kv_cache import KVCacheLayout

logger = logging.getLogger(__name__)

HEADER = struct.Struct("<4sB3x16sQQ")
MAGIC = b"PDKV"
DATA, SYNC, ACK, NACK, DATAV = 1, 2, 3, 4, 5
CHUNK_BYTES = 4 << 20
CHUNKS_PER_FRAME = 256  # DATAV; also bounds what a cancelled write still sends
BUFFERS_PER_SYSCALL = 64  # below IOV_MAX (1024); larger lists cost more to slice
MIN_BYTES_PER_STREAM = 1 << 20  # a write uses one more stream per MiB it carries
SOCKET_TIMEOUT_S = 30.0
AUTH_TIMEOUT_S = 10.0
AUTH_PURPOSE = "kv-tcp"


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ConnectionError if the peer closes first."""
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed the stream")
        view = view[n:]


def recv_into_all(sock: socket.socket, views: list[memoryview]) -> None:
    """Fill ``views`` in order from ``sock`` (scatter reads: many views per system
    call); ConnectionError if the peer closes first."""
    i = 0
    while i < len(views):
        n = sock.recvmsg_into(views[i : i + BUFFERS_PER_SYSCALL])[0]
        if n == 0:
            raise ConnectionError("peer closed the stream")
        while n:  # step over the views this call filled
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


def _send_all(sock: socket.socket, buffers: list[memoryview | bytes]) -> None:
    """sendmsg until every buffer is out (a call may send only part)."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 8 << 20)


@dataclass
class _Job:
    handle: TransferHandle
    transfer_id: bytes
    chunks: list[Region] = field(default_factory=list)
    nbytes: int = 0


class _Stream:
    """One sending socket: jobs go out in order; their SYNCs are acknowledged in order."""

    def __init__(self, address: tuple[str, int], source: TcpTransferEngine, name: str):
        self.name = name
        self.sock = socket.create_connection(address, timeout=SOCKET_TIMEOUT_S)
        _tune(self.sock)
        if source.secret is not None:
            try:
                respond(self.sock, source.secret, AUTH_PURPOSE, source.session)
            except OSError:
                self.sock.close()
                raise
        self.source = source
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.pending: deque[tuple[int, TransferHandle]] = deque()
        self.lock = threading.Lock()
        self.broken: TransferError | None = None
        self._seq = 0
        self._staging = Staging(source.pool, CHUNK_BYTES) if source.pool.is_cuda else None
        threading.Thread(target=self._write_loop, name=f"{name}-tx", daemon=True).start()
        threading.Thread(target=self._ack_loop, name=f"{name}-rx", daemon=True).start()

    def submit(self, job: _Job) -> None:
        if self.broken is not None:
            job.handle.fail(self.broken)
        else:
            self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)

    def _write_loop(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                self._send(job)
            self.sock.shutdown(socket.SHUT_WR)  # closed by us: the ack loop sees EOF
        except OSError as e:
            self._break(TransferError(f"{self.name}: send failed: {e}"))

    def _send(self, job: _Job) -> None:
        # Host pools: many chunks per DATAV frame (scattered blocks are small). GPU pools
        # go chunk by chunk through the one staging buffer.
        batch = 1 if self._staging is not None else CHUNKS_PER_FRAME
        for first in range(0, len(job.chunks), batch):
            if job.handle.is_done:  # cancelled or failed elsewhere: skip what is left
                break
            group = job.chunks[first : first + batch]
            if self._staging is not None:
                (chunk,) = group
                header = HEADER.pack(MAGIC, DATA, job.transfer_id, chunk.dst_offset, chunk.nbytes)
                _send_all(self.sock, [header, self._payload(chunk)])
                continue
            table = np.array([(c.dst_offset, c.nbytes) for c in group], dtype="<u8")
            nbytes = int(table[:, 1].sum())
            header = HEADER.pack(MAGIC, DATAV, job.transfer_id, len(group), nbytes)
            _send_all(self.sock, [header, table.tobytes(), *map(self._payload, group)])
        with self.lock:
            self._seq += 1
            self.pending.append((self._seq, job.handle))
        self.sock.sendall(HEADER.pack(MAGIC, SYNC, job.transfer_id, self._seq, 0))

    def _payload(self, chunk: Region) -> memoryview:
        if self._staging is not None:
            return self._staging.load(chunk.src_offset, chunk.nbytes)
        return self.source.host[chunk.src_offset : chunk.src_offset + chunk.nbytes]

    def _ack_loop(self) -> None:
        header = bytearray(HEADER.size)
        try:
            while True:
                try:
                    recv_exact(self.sock, memoryview(header))
                except TimeoutError:
                    with self.lock:
                        idle = not self.pending
                    if idle:  # the socket timeout bounds sends; an idle stream is fine
                        continue
                    raise
                magic, kind, transfer_id, seq, nbytes = HEADER.unpack(header)
                reason = b""
                if kind == NACK:
                    reason = bytearray(nbytes)
                    recv_exact(self.sock, memoryview(reason))
                with self.lock:
                    expected, handle = self.pending.popleft()
                if magic != MAGIC or seq != expected or kind not in (ACK, NACK):
                    raise ConnectionError(f"bad acknowledgement (kind {kind}, seq {seq})")
                if kind == ACK:
                    handle.part_done()
                else:
                    name = transfer_id.hex()[:8]
                    handle.fail(TransferError(f"{self.name}: peer refused transfer "
                                              f"{name}: {reason.decode()}"))  # fmt: skip
        except (OSError, IndexError) as e:
            self._break(TransferError(f"{self.name}: stream broke: {e}"))

    def _break(self, error: TransferError) -> None:
        with self.lock:
            if self.broken is None:
                self.broken = error
            failed = [handle for _, handle in self.pending]
            self.pending.clear()
        for handle in failed:
            handle.fail(error)
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.handle.fail(error)
        with contextlib.suppress(OSError):
            self.sock.close()


class _Receiver:
    """Accepts streams and lands their frames in the pool."""

    def __init__(self, engine: TcpTransferEngine, host: str, port: int):
        self.engine = engine
        self.listener = socket.create_server((host, port), backlog=128)
        self.address = self.listener.getsockname()[:2]
        self.closed = False
        threading.Thread(target=self._accept_loop, name="tcp-kv-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            _tune(sock)
            sock.settimeout(None)  # a stream may idle between requests
            threading.Thread(target=self._serve, args=(sock, peer), daemon=True).start()

    def _serve(self, sock: socket.socket, peer: tuple) -> None:
        engine = self.engine
        header = bytearray(HEADER.size)
        refused: dict[bytes, str] = {}  # transfer id -> why, until its SYNC
        staging = Staging(engine.pool, CHUNK_BYTES) if engine.pool.is_cuda else None
        session = b""
        try:
            if engine.secret is not None:  # prove the secret before a frame is read
                sock.settimeout(AUTH_TIMEOUT_S)
                session = challenge(sock, engine.secret, AUTH_PURPOSE)
                sock.settimeout(None)
            while True:
                recv_exact(sock, memoryview(header))
                magic, kind, transfer_id, offset, nbytes = HEADER.unpack(header)
                if magic != MAGIC or kind not in (DATA, DATAV, SYNC):
                    raise ConnectionError(f"not a KV stream (magic {magic!r}, kind {kind})")
                if kind == SYNC:
                    why = refused.pop(transfer_id, None)
                    if why is None:
                        sock.sendall(HEADER.pack(MAGIC, ACK, transfer_id, offset, 0))
                    else:
                        reason = why.encode()
                        sock.sendall(HEADER.pack(MAGIC, NACK, transfer_id, offset, len(reason)))
                        sock.sendall(reason)
                    continue
                if kind == DATA:  # one chunk (GPU senders, through their staging)
                    if nbytes > CHUNK_BYTES:  # its bytes could not even be drained
                        raise ConnectionError(f"a DATA frame of {nbytes} bytes")
                    offsets = np.array([offset if offset < 2**63 else -1])  # -1: refused
                    sizes = np.array([nbytes])
                else:
                    offsets, sizes = self._read_table(sock, offset, nbytes)
                why = self._land(sock, transfer_id, offsets, sizes, staging, session)
                if why is not None:
                    refused[transfer_id] = why
        except AuthError as e:
            logger.warning("tcp KV stream from %s refused: %s", peer, e)
        except (OSError, ConnectionError) as e:
            if not self.closed:
                logger.debug("tcp KV stream from %s ended: %s", peer, e)
        finally:
            sock.close()

    @staticmethod
    def _read_table(sock: socket.socket, count: int, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
        """A DATAV frame's destinations: (offsets, sizes)."""
        if not 0 < count <= CHUNKS_PER_FRAME:
            raise ConnectionError(f"a DATAV frame of {count} chunks")
        table = bytearray(16 * count)
        recv_exact(sock, memoryview(table))
        offsets, sizes = np.frombuffer(table, dtype="<i8").reshape(count, 2).T
        # Bounded before summing: a table of huge sizes must not wrap around to nbytes.
        if (sizes <= 0).any() or (sizes > CHUNK_BYTES).any():
            raise ConnectionError(f"a DATAV frame with a chunk outside (0, {CHUNK_BYTES}] bytes")
        if int(sizes.sum()) != nbytes:
            raise ConnectionError("a DATAV frame's table does not add up to its payload")
        return offsets, sizes

    def _land(self, sock: socket.socket, transfer_id: bytes, offsets: np.ndarray,
              sizes: np.ndarray, staging: Staging | None,
              session: bytes) -> str | None:  # fmt: skip
        """Receive a frame's chunks into the pool; why they were refused, or None."""
        why = self.engine.check_allowed_regions(transfer_id, offsets, sizes, session)
        if why is None and (sizes > CHUNK_BYTES).any():
            why = f"a chunk of {int(sizes.max())} bytes exceeds {CHUNK_BYTES}"
        if why is not None:
            self._drain(sock, int(sizes.sum()))
        elif staging is not None:
            for offset, size in zip(offsets.tolist(), sizes.tolist(), strict=True):
                recv_exact(sock, staging.view[:size])
                staging.store(offset, size)
        else:
            host, ends = self.engine.host, (offsets + sizes).tolist()
            recv_into_all(sock, [host[a:b] for a, b in zip(offsets.tolist(), ends, strict=True)])
        return why

    @staticmethod
    def _drain(sock: socket.socket, nbytes: int) -> None:
        sink = memoryview(bytearray(min(nbytes, 1 << 20)))
        while nbytes:
            n = sock.recv_into(sink[: min(nbytes, len(sink))])
            if n == 0:
                raise ConnectionError("peer closed the stream")
            nbytes -= n

    def close(self) -> None:
        self.closed = True
        self.listener.close()


class TcpTransferEngine(TransferEngine):
    protocol = "tcp"

    def __init__(
        self,
        pool: torch.Tensor,
        layout: KVCacheLayout,
        host: str = "127.0.0.1",
        port: int = 0,
        num_streams: int = 4,
        listen: bool = True,
        secret: bytes | None = None,
        session: bytes | None = None,
    ):
        super().__init__(pool, layout)
        self.host = host_view(pool)
        self.secret = secret  # the cluster secret: both ends prove it at connect
        # Names our streams to peers. The TP ranks of one instance share it: a decode
        # rank may take a transfer's heads from several of them.
        self.session = session or secrets.token_bytes(SESSION_BYTES)
        self.num_streams = num_streams
        self._streams: dict[str, list[_Stream]] = {}
        self._rotation = itertools.count()
        self._lock = threading.Lock()
        self._receiver = _Receiver(self, host, port) if listen else None

    def endpoint(self) -> dict:
        if self._receiver is None:
            raise RuntimeError("this tcp engine does not listen")
        host, port = self._receiver.address
        return {"protocol": "tcp", "host": host, "port": port}

    def connect(self, peer_id: str, endpoint: dict) -> None:
        with self._lock:
            streams = self._streams.get(peer_id)
            if streams and all(s.broken is None for s in streams):
                return
        address = (endpoint["host"], int(endpoint["port"]))
        try:
            fresh = [_Stream(address, self, f"tcp[{peer_id}#{i}]") for i in range(self.num_streams)]
        except OSError as e:
            raise TransferError(f"cannot connect to {peer_id} at {address}: {e}") from e
        with self._lock:
            old, self._streams[peer_id] = self._streams.get(peer_id, []), fresh
        for stream in old:
            stream.close()

    def write(self, peer_id: str, transfer_id: bytes, regions: Sequence[Region]) -> TransferHandle:
        with self._lock:
            streams = self._streams.get(peer_id)
        if not streams:
            raise TransferError(f"not connected to {peer_id}")
        regions = Regions.of(regions)
        # Each stream a write uses costs a SYNC round trip: small writes use fewer, taken
        # round robin so that many small writes still spread over all of them.
        wanted = max(1, min(len(streams), -(-regions.total_bytes // MIN_BYTES_PER_STREAM)))
        first = next(self._rotation) % len(streams)
        streams = (streams[first:] + streams[:first])[:wanted]
        jobs = [_Job(TransferHandle(""), transfer_id) for _ in streams]
        for region in regions:  # cut into chunks, each to the least-loaded stream
            for start in range(0, region.nbytes, CHUNK_BYTES):
                nbytes = min(CHUNK_BYTES, region.nbytes - start)
                job = min(jobs, key=lambda j: j.nbytes)
                job.chunks.append(
                    Region(region.src_offset + start, region.dst_offset + start, nbytes)
                )
                job.nbytes += nbytes
        used = [(stream, job) for stream, job in zip(streams, jobs, strict=True) if job.chunks]
        name = f"tcp write {transfer_id.hex()[:8]} to {peer_id}"
        handle = TransferHandle(name, num_parts=len(used))
        for stream, job in used:
            job.handle = handle
            stream.submit(job)
        return handle

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
        with self._lock:
            streams = [s for group in self._streams.values() for s in group]
            self._streams.clear()
        for stream in streams:
            stream.close()
