"""The hardware-independent half of the rdma backend: work-request planning with
selective signalling, the QP handshake encoding, NIC choice, and readable errors.
Unit-tested everywhere; rdma.py drives the verbs with it."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cache_transfer.regions import Region
from proto import pd_comm_pb2 as pb

MAX_WR_BYTES = 1 << 30  # one RDMA WRITE may carry up to 2 GiB; stay well below
_LENGTH = struct.Struct(">I")
MAX_HANDSHAKE_BYTES = 4096


@dataclass(frozen=True)
class WorkItem:
    wr_id: int
    local_addr: int
    remote_addr: int
    length: int
    signaled: bool


def plan_work_requests(
    regions: Sequence[Region],
    local_base: int,
    remote_base: int,
    first_wr_id: int = 1,
    signal_every: int = 16,
    max_wr_bytes: int = MAX_WR_BYTES,
) -> list[WorkItem]:
    """RDMA WRITEs for ``regions``. Every ``signal_every``-th WR and the last one ask for
    a completion: on an RC QP completions arrive in order, so one signalled completion
    retires every WR before it, and the send queue never fills with unreported WRs."""
    if signal_every < 1:
        raise ValueError("signal_every must be >= 1")
    items: list[WorkItem] = []
    wr_id = first_wr_id
    for region in regions:
        for start in range(0, region.nbytes, max_wr_bytes):
            length = min(max_wr_bytes, region.nbytes - start)
            signaled = (len(items) + 1) % signal_every == 0
            items.append(WorkItem(wr_id, local_base + region.src_offset + start,
                                  remote_base + region.dst_offset + start, length,
                                  signaled))  # fmt: skip
            wr_id += 1
    if items and not items[-1].signaled:
        last = items[-1]
        items[-1] = WorkItem(last.wr_id, last.local_addr, last.remote_addr, last.length, True)
    return items


def windows(items: Sequence[WorkItem], max_batch: int) -> list[list[WorkItem]]:
    """Split WRs into batches of at most ``max_batch`` that each end with a signalled WR,
    whose completion retires the whole batch (the poster counts send-queue slots by
    batch)."""
    batches: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    for item in items:
        current.append(item)
        if item.signaled or len(current) == max_batch:
            if not current[-1].signaled:
                last = current[-1]
                current[-1] = WorkItem(last.wr_id, last.local_addr, last.remote_addr,
                                       last.length, True)  # fmt: skip
            batches.append(current)
            current = []
    return batches


def encode_qp_info(info: pb.RdmaQpInfo) -> bytes:
    body = info.SerializeToString()
    return _LENGTH.pack(len(body)) + body


def decode_qp_info(read_exact) -> pb.RdmaQpInfo:  # type: ignore[no-untyped-def]
    """Read one length-prefixed RdmaQpInfo with ``read_exact(n) -> bytes``."""
    (length,) = _LENGTH.unpack(read_exact(_LENGTH.size))
    if length > MAX_HANDSHAKE_BYTES:
        raise ValueError(f"RDMA handshake of {length} bytes: not a pd-serve peer")
    info = pb.RdmaQpInfo()
    info.ParseFromString(read_exact(length))
    if info.qp_num == 0:
        raise ValueError("RDMA handshake without a QP number")
    return info


def pick_nic(local_gpu: int, nics_env: str | None = None) -> str:
    """GPU rank i uses NIC i mod n of ``KVCACHE_RDMA_NICS`` (comma-separated)."""
    value = os.environ.get("KVCACHE_RDMA_NICS", "") if nics_env is None else nics_env
    nics = [n.strip() for n in value.split(",") if n.strip()]
    if not nics:
        raise ValueError(
            "KVCACHE_RDMA_NICS is empty: run `export $(bash scripts/get_rdma_nics.sh gpu)`"
        )
    return nics[local_gpu % len(nics)]


# ibv_wc_status values (verbs.h) -> what a user can do about them.
WC_STATUS = {
    1: "local length error: a WR is longer than the registered memory",
    2: "local QP operation error",
    4: "local protection error: the KV pool is not (or no longer) registered",
    5: "flushed: the queue pair entered the error state after an earlier failure",
    9: "remote invalid request: the peer refused the WRITE",
    10: "remote access error: the peer's rkey/address does not cover this write "
    "(its reservation was released, or the layouts differ)",
    11: "remote operation error",
    12: "transport retry counter exceeded: the peer is unreachable or its QP is down",
    13: "RNR retry counter exceeded: the peer is not ready",
}


def describe_wc_status(status: int) -> str:
    return WC_STATUS.get(status, f"work completion status {status}")
