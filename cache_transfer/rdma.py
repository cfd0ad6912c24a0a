"""The rdma backend on pyverbs: one-sided RDMA WRITEs from the prefill pool into the
decode pool over an RC queue pair per peer.

- The device is ``KVCACHE_RDMA_NICS``'s entry for this rank's GPU (``pick_nic``); the
  whole KV pool is one memory region (GPU memory where the NIC can register it, i.e.
  with nvidia-peermem / dma-buf support).
- Queue pairs are brought up by exchanging ``RdmaQpInfo`` over TCP on the decode TP
  rank's ``--rdma-comm-ports`` entry; Reserve's endpoint carries that port plus the
  pool's address and rkey.
- A write becomes WRs planned by ``rdma_plan`` (selective signalling, bounded
  outstanding WRs: a full send queue means waiting for completions, not failing),
  posted and polled by one worker thread per peer; completion errors become
  TransferErrors with ``describe_wc_status``'s explanation.

NOTE: no RDMA device exists on our build and test machines; this module is exercised
by ``pytest -m rdma`` wherever ``ibv_devices`` lists one, and skipped elsewhere.
"""

from __future__ import annotations

import logging
import queue
import random
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch

from cache_transfer.auth import SESSION_BYTES, challenge, respond
from cache_transfer.rdma_plan import (
    decode_qp_info,
    describe_wc_status,
    encode_qp_info,
    plan_work_requests,
    windows,
)
from cache_transfer.regions import Region
from cache_transfer.tcp import recv_exact
from cache_transfer.transfer_engine import TransferEngine, TransferError, TransferHandle
from engine.kv_cache import KVCacheLayout
from proto import pd_comm_pb2 as pb

logger = logging.getLogger(__name__)

AUTH_PURPOSE = "rdma-qp"
_HANDSHAKE_TIMEOUT_S = 10.0

MAX_OUTSTANDING = 256  # the send queue depth
SIGNAL_EVERY = 16
CQ_DEPTH = 1024
POLL_TIMEOUT_S = 30.0


def rdma_available(nic: str | None = None) -> tuple[bool, str]:
    """Whether the rdma backend can run here, and why not."""
    try:
        from pyverbs.device import get_device_list
        from pyverbs.pyverbs_error import PyverbsError
    except ImportError:
        return False, (
            "pyverbs is not importable (Debian/Ubuntu: apt install python3-pyverbs, then "
            "link /usr/lib/python3/dist-packages/pyverbs into the venv)"
        )
    try:
        names = [d.name.decode() for d in get_device_list()]
    except PyverbsError as e:
        return False, f"no RDMA device ({e})"
    if not names:
        return False, "no RDMA device (ibv_devices lists none)"
    if nic is not None and nic not in names:
        return False, f"RDMA device {nic} not found (have {', '.join(names)})"
    return True, f"RDMA devices: {', '.join(names)}"


def _read_exact(sock: socket.socket):  # type: ignore[no-untyped-def]
    def read(n: int) -> bytes:
        data = bytearray(n)
        recv_exact(sock, memoryview(data))
        return bytes(data)

    return read


class _Verbs:
    """The verbs objects of one rank: device context, PD and the pool's MR; a CQ per QP
    (so that each peer's worker polls only its own completions)."""

    def __init__(self, nic: str, pool: torch.Tensor, port_num: int, gid_index: int):
        import pyverbs.enums as e
        from pyverbs.cq import CQ
        from pyverbs.device import Context
        from pyverbs.mr import MR
        from pyverbs.pd import PD

        self.e = e
        self.port_num = port_num
        self.gid_index = gid_index
        self.context = Context(name=nic)
        self.pd = PD(self.context)
        nbytes = pool.numel() * pool.element_size()
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        self.pool_addr = pool.data_ptr()
        self.mr = MR(self.pd, nbytes, access, address=self.pool_addr)
        self._cq_type = CQ
        self.port = self.context.query_port(port_num)
        self.gid = str(self.context.query_gid(port_num, gid_index).gid)

    def new_qp(self):  # type: ignore[no-untyped-def]
        """A fresh RC QP in INIT state, with its own CQ: (qp, cq)."""
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

        e = self.e
        cq = self._cq_type(self.context, CQ_DEPTH)
        cap = QPCap(max_send_wr=MAX_OUTSTANDING, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0)
        qp = QP(self.pd, init)
        attr = QPAttr(qp_state=e.IBV_QPS_INIT)
        attr.port_num = self.port_num
        attr.pkey_index = 0
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        qp.to_init(attr)
        return qp, cq

    def my_info(self, qp) -> pb.RdmaQpInfo:  # type: ignore[no-untyped-def]
        return pb.RdmaQpInfo(
            qp_num=qp.qp_num, lid=self.port.lid, gid=self.gid, psn=random.getrandbits(24),
            mtu=self.port.active_mtu, gid_index=self.gid_index,
        )  # fmt: skip

    def connect_qp(self, qp, mine: pb.RdmaQpInfo, peer: pb.RdmaQpInfo) -> None:  # type: ignore[no-untyped-def]
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        e = self.e
        attr = QPAttr(qp_state=e.IBV_QPS_RTR)
        attr.path_mtu = min(mine.mtu, peer.mtu)
        attr.dest_qp_num = peer.qp_num
        attr.rq_psn = peer.psn
        attr.max_dest_rd_atomic = 1
        attr.min_rnr_timer = 12
        dgid = GID()
        dgid.gid = peer.gid
        route = GlobalRoute(dgid=dgid, sgid_index=self.gid_index)
        attr.ah_attr = AHAttr(gr=route, is_global=1, dlid=peer.lid, port_num=self.port_num)
        qp.to_rtr(attr)
        attr.qp_state = e.IBV_QPS_RTS
        attr.sq_psn = mine.psn
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        attr.max_rd_atomic = 1
        qp.to_rts(attr)


class _Peer:
    """One connected QP and the worker that posts its writes and polls completions."""

    def __init__(self, verbs: _Verbs, qp, cq, remote_addr: int, rkey: int, name: str):  # type: ignore[no-untyped-def]
        self.verbs, self.qp, self.cq, self.remote_addr, self.rkey, self.name = (
            verbs, qp, cq, remote_addr, rkey, name
        )  # fmt: skip
        self.jobs: queue.Queue = queue.Queue()
        self.next_wr_id = 1
        self.broken: TransferError | None = None  # a failed WR leaves the QP in error
        threading.Thread(target=self._run, name=f"rdma-{name}", daemon=True).start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            regions, handle = job
            try:
                self._write(regions, handle)
                handle.part_done()
            except TransferError as error:
                self.broken = error
                handle.fail(error)

    def _write(self, regions: Sequence[Region], handle: TransferHandle) -> None:
        """Post every WR with at most MAX_OUTSTANDING unretired; a full window waits for
        the oldest batch's completion (backpressure, never a send-queue overflow)."""
        from pyverbs.wr import SGE, SendWR

        e = self.verbs.e
        items = plan_work_requests(regions, self.verbs.pool_addr, self.remote_addr,
                                   self.next_wr_id, signal_every=SIGNAL_EVERY)  # fmt: skip
        self.next_wr_id += len(items)
        in_flight: deque[tuple[int, int]] = deque()  # (signalled wr id, batch size)
        num_in_flight = 0
        for batch in windows(items, SIGNAL_EVERY):
            while num_in_flight + len(batch) > MAX_OUTSTANDING:
                num_in_flight -= self._retire(in_flight)
            if handle.is_done:  # cancelled: post nothing more, let posted WRs finish
                break
            for item in batch:
                flags = e.IBV_SEND_SIGNALED if item.signaled else 0
                sge = SGE(item.local_addr, item.length, self.verbs.mr.lkey)
                wr = SendWR(wr_id=item.wr_id, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[sge],
                            send_flags=flags)  # fmt: skip
                wr.set_wr_rdma(self.rkey, item.remote_addr)
                self.qp.post_send(wr)
            in_flight.append((batch[-1].wr_id, len(batch)))
            num_in_flight += len(batch)
        while in_flight:
            self._retire(in_flight)

    def _retire(self, in_flight: deque[tuple[int, int]]) -> int:
        """Wait for the oldest in-flight batch's completion; returns its size."""
        wr_id, size = in_flight[0]
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while time.monotonic() < deadline:
            num, completions = self.cq.poll(16)
            for wc in completions[:num]:
                if wc.status != self.verbs.e.IBV_WC_SUCCESS:
                    raise TransferError(f"{self.name}: {describe_wc_status(wc.status)}")
                if wc.wr_id == wr_id:
                    in_flight.popleft()
                    return size
            if num == 0:
                time.sleep(0)
        raise TransferError(f"{self.name}: no completion within {POLL_TIMEOUT_S} s")


class RdmaTransferEngine(TransferEngine):
    protocol = "rdma"

    def __init__(
        self,
        pool: torch.Tensor,
        layout: KVCacheLayout,
        nic: str,
        comm_port: int = 0,
        host: str = "0.0.0.0",
        port_num: int = 1,
        gid_index: int = 0,
        listen: bool = True,
        secret: bytes | None = None,
    ):
        super().__init__(pool, layout)
        self.secret = secret  # both ends prove it before QP info is exchanged
        available, why = rdma_available(nic)
        if not available:
            raise TransferError(f"rdma backend unavailable: {why}")
        self.verbs = _Verbs(nic, pool, port_num, gid_index)
        self.hostname = socket.gethostname()
        self._peers: dict[str, _Peer] = {}
        self._accepted: list = []  # QPs of peers writing into us; kept alive
        self._listener = socket.create_server((host, comm_port)) if listen else None
        if self._listener is not None:
            threading.Thread(target=self._accept_loop, name="rdma-comm", daemon=True).start()

    def endpoint(self) -> dict:
        if self._listener is None:
            raise RuntimeError("this rdma engine does not listen")
        return {"protocol": "rdma", "host": self.hostname,
                "comm_port": self._listener.getsockname()[1], "addr": self.verbs.pool_addr,
                "rkey": self.verbs.mr.rkey, "nbytes": self.layout.total_bytes}  # fmt: skip

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with sock:
                try:
                    sock.settimeout(_HANDSHAKE_TIMEOUT_S)  # a silent peer cannot stall us
                    if self.secret is not None:
                        challenge(sock, self.secret, AUTH_PURPOSE)
                    peer = decode_qp_info(_read_exact(sock))
                    qp, cq = self.verbs.new_qp()
                    mine = self.verbs.my_info(qp)
                    self.verbs.connect_qp(qp, mine, peer)
                    sock.sendall(encode_qp_info(mine))
                    self._accepted.append((qp, cq))
                except Exception as e:  # a bad peer must not stop the listener
                    logger.warning("rdma handshake failed: %s", e)

    def connect(self, peer_id: str, endpoint: dict) -> None:
        if peer_id in self._peers:
            return
        qp, cq = self.verbs.new_qp()
        mine = self.verbs.my_info(qp)
        address = (endpoint["host"], int(endpoint["comm_port"]))
        try:
            with socket.create_connection(address, timeout=10) as sock:
                if self.secret is not None:
                    respond(sock, self.secret, AUTH_PURPOSE, secrets.token_bytes(SESSION_BYTES))
                sock.sendall(encode_qp_info(mine))
                peer = decode_qp_info(_read_exact(sock))
        except (OSError, ValueError) as e:
            raise TransferError(f"RDMA handshake with {peer_id} at {address} failed: {e}") from e
        self.verbs.connect_qp(qp, mine, peer)
        self._peers[peer_id] = _Peer(self.verbs, qp, cq, int(endpoint["addr"]),
                                     int(endpoint["rkey"]), f"rdma[{peer_id}]")  # fmt: skip

    def write(self, peer_id: str, transfer_id: bytes, regions: Sequence[Region]) -> TransferHandle:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransferError(f"not connected to {peer_id}")
        if peer.broken is not None:
            self._peers.pop(peer_id).jobs.put(None)  # the next connect() starts a fresh QP
            raise TransferError(f"queue pair to {peer_id} failed earlier: {peer.broken}")
        handle = TransferHandle(f"rdma write {transfer_id.hex()[:8]} to {peer_id}")
        peer.jobs.put((list(regions), handle))
        return handle

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for peer in self._peers.values():
            peer.jobs.put(None)
        self._peers.clear()
