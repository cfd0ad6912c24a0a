"""The ipc backend: two processes of one host.

- CPU pools live in shared memory (``allocate_shared_pool``: a file in /dev/shm); the
  peer maps the file once and copies regions straight into it.
- CUDA pools are exported with a CUDA IPC handle; the peer opens it once (the same
  mechanism torch.multiprocessing uses) and copies on a dedicated stream that first
  waits for the work already queued on the caller's stream, so a layer's write starts
  as soon as that layer's KV is computed, while later layers compute.
On CUDA, many small regions (scattered blocks) are moved as gather -> one bulk copy ->
scatter (three kernels) instead of one copy launch per region, whose fixed cost would
dominate; few large regions are copied directly. On CPU each region is one memcpy of
memoryview slices (the cheapest per-region call Python has).
Writes are one-sided: the receiver cannot refuse them, so the caller must only write
into blocks pd-comm reserved for it (the lease bounds how long that holds).
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import uuid
from collections.abc import Sequence

import numpy as np
import torch

from cache_transfer.pool_bytes import flat_bytes, host_view
from cache_transfer.regions import Region, Regions
from cache_transfer.transfer_engine import TransferEngine, TransferError, TransferHandle
from engine.kv_cache import KVCacheLayout

SHM_DIR = "/dev/shm"
# Regions smaller than this on average go through gather/scatter (see module docstring).
DIRECT_COPY_MIN_BYTES = 1 << 20
PIPELINE_CHUNK_BYTES = 64 << 20


def allocate_shared_pool(
    layout: KVCacheLayout, path: str | None = None
) -> tuple[torch.Tensor, str]:
    """A zeroed CPU KV pool backed by a shared-memory file; returns (pool, path)."""
    path = path or os.path.join(SHM_DIR, f"pd-kv-{uuid.uuid4().hex}")
    numel = 1
    for size in layout.shape:
        numel *= size
    pool = torch.from_file(path, shared=True, size=numel, dtype=layout.dtype)
    return pool.view(layout.shape), path


def copy_regions(
    src: torch.Tensor,
    dst: torch.Tensor,
    regions: Sequence[Region],
    unit: int,
    landing: torch.cuda.Stream | None = None,
) -> None:
    """Copy byte ``regions`` from flat ``src`` to flat ``dst``, queued on the devices'
    current streams. Every region is a whole number of ``unit``-byte blocks at
    unit-aligned offsets (regions.py guarantees it), which the gather/scatter path
    relies on. Across devices ``landing`` (a spare stream on dst's device) is required.

    NOTE: a copy *into* memory opened through CUDA IPC from another device crawls
    (~38 GB/s between two H200s over NVLink, against ~390 GB/s into ordinary peer
    memory, 2026-11-22). So bytes bound for another device land in ordinary memory on
    that device first, chunk by chunk, and move into the pool there while the next
    chunk crosses (a two-stage pipeline: the P2P copies bound the rate)."""
    if not regions:
        return
    if src.device != dst.device:
        _copy_across(src, dst, regions, unit, landing)
        return
    if Regions.of(regions).total_bytes // len(regions) >= DIRECT_COPY_MIN_BYTES:
        for r in regions:
            dst[r.dst_offset : r.dst_offset + r.nbytes].copy_(
                src[r.src_offset : r.src_offset + r.nbytes], non_blocking=True
            )
        return
    src_index, dst_index = unit_indices(regions, unit)
    rows_src, rows_dst = _rows(src, unit), _rows(dst, unit)
    gathered = rows_src.index_select(0, _to(src_index, src.device))
    rows_dst.index_copy_(0, _to(dst_index, dst.device), gathered)


def _copy_across(
    src: torch.Tensor,
    dst: torch.Tensor,
    regions: Sequence[Region],
    unit: int,
    landing: torch.cuda.Stream | None,
) -> None:
    if landing is None:
        raise ValueError("a cross-device copy needs a landing stream on the destination")
    place = torch.cuda.current_stream(dst.device)  # where chunks move into the pool
    src_index, dst_index = unit_indices(regions, unit)
    src_index, dst_index = _to(src_index, src.device), _to(dst_index, dst.device)
    rows_src, rows_dst = _rows(src, unit), _rows(dst, unit)
    rows_per_chunk = max(PIPELINE_CHUNK_BYTES // unit, 1)
    for first in range(0, len(src_index), rows_per_chunk):
        last = first + rows_per_chunk
        gathered = rows_src.index_select(0, src_index[first:last])
        # The P2P copy runs on src's current stream and is ordered with dst's current
        # stream: make that the landing stream, so it never waits for earlier placing.
        with torch.cuda.stream(landing):
            moved = gathered.to(dst.device, non_blocking=True)
        place.wait_stream(landing)
        moved.record_stream(place)
        rows_dst.index_copy_(0, dst_index[first:last], moved)


def _rows(flat: torch.Tensor, unit: int) -> torch.Tensor:
    """``flat`` as [blocks of every layer and K|V, unit bytes], in 8-byte words when
    possible (wide rows gather and scatter faster)."""
    if unit % 8 == 0:
        return flat.view(torch.int64).view(-1, unit // 8)
    return flat.view(-1, unit)


def _to(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


def unit_indices(regions: Sequence[Region], unit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-unit indices of every region's source and destination, in order."""
    arrays = Regions.of(regions)
    table = np.stack([arrays.src_offset, arrays.dst_offset, arrays.nbytes], axis=1)
    if (table % unit).any():
        raise ValueError(f"regions are not whole numbers of {unit}-byte blocks")
    table = table // unit
    counts = table[:, 2]
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    src = np.repeat(table[:, 0], counts) + within
    dst = np.repeat(table[:, 1], counts) + within
    return torch.from_numpy(src), torch.from_numpy(dst)


def copy_regions_host(src: torch.Tensor, dst: torch.Tensor, regions: Sequence[Region]) -> None:
    """CPU: large regions through torch (multi-threaded memcpy), small ones as memoryview
    slice assignments (the cheapest per-call cost)."""
    src_view, dst_view = host_view(src), host_view(dst)
    for r in regions:
        if r.nbytes >= DIRECT_COPY_MIN_BYTES:
            dst[r.dst_offset : r.dst_offset + r.nbytes].copy_(
                src[r.src_offset : r.src_offset + r.nbytes]
            )
        else:
            dst_view[r.dst_offset : r.dst_offset + r.nbytes] = src_view[
                r.src_offset : r.src_offset + r.nbytes
            ]


class IpcTransferEngine(TransferEngine):
    protocol = "ipc"

    def __init__(self, pool: torch.Tensor, layout: KVCacheLayout, shm_path: str | None = None):
        super().__init__(pool, layout)
        self.shm_path = shm_path
        self.hostname = socket.gethostname()
        self._local = flat_bytes(pool)
        self._peers: dict[str, torch.Tensor] = {}  # flat uint8 views of peer pools
        self._jobs: queue.Queue = queue.Queue()
        self._stream = torch.cuda.Stream(pool.device) if pool.is_cuda else None
        self._peer_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._landing_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._worker = threading.Thread(target=self._run, name="ipc-kv", daemon=True)
        self._worker.start()

    def endpoint(self) -> dict:
        if self._stream is None:
            if self.shm_path is None:
                raise ValueError(
                    "receiving over ipc on CPU needs the KV pool in shared memory "
                    "(allocate_shared_pool)"
                )
            return {"protocol": "ipc", "host": self.hostname, "kind": "shm",
                    "path": self.shm_path, "nbytes": self._local.numel()}  # fmt: skip
        storage = self.pool.untyped_storage()
        (device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = (
            storage._share_cuda_()
        )
        return {"protocol": "ipc", "host": self.hostname, "kind": "cuda", "device": device,
                "handle": handle, "size": size, "offset": offset, "ref_handle": ref_handle,
                "ref_offset": ref_offset, "event_handle": event_handle,
                "event_sync": event_sync, "nbytes": self._local.numel()}  # fmt: skip

    def connect(self, peer_id: str, endpoint: dict) -> None:
        if peer_id in self._peers:
            return
        if endpoint.get("host") != self.hostname:
            raise TransferError(
                f"ipc needs both ranks on one host: {peer_id} is on {endpoint.get('host')}, "
                f"this rank on {self.hostname}"
            )
        try:
            self._peers[peer_id] = self._open(endpoint)
        except (OSError, RuntimeError) as e:
            raise TransferError(f"cannot open {peer_id}'s KV pool over ipc: {e}") from e

    def _open(self, endpoint: dict) -> torch.Tensor:
        nbytes = int(endpoint["nbytes"])
        if endpoint["kind"] == "shm":
            if self._stream is not None:
                raise TransferError("a CUDA pool cannot write into a peer's CPU pool over ipc")
            if os.path.getsize(endpoint["path"]) != nbytes:
                raise TransferError(f"{endpoint['path']} is not {nbytes} bytes")
            return torch.from_file(endpoint["path"], shared=True, size=nbytes, dtype=torch.uint8)
        if self._stream is None:
            raise TransferError("a CPU pool cannot write into a peer's CUDA pool over ipc")
        storage = torch.UntypedStorage._new_shared_cuda(
            endpoint["device"], endpoint["handle"], endpoint["size"], endpoint["offset"],
            endpoint["ref_handle"], endpoint["ref_offset"], endpoint["event_handle"],
            endpoint["event_sync"],
        )  # fmt: skip
        peer = torch.empty(0, dtype=torch.uint8, device=f"cuda:{endpoint['device']}")
        return peer.set_(storage, 0, (nbytes,), (1,))

    def write(self, peer_id: str, transfer_id: int, regions: Sequence[Region]) -> TransferHandle:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransferError(f"not connected to {peer_id}")
        handle = TransferHandle(f"ipc write {transfer_id} to {peer_id}")
        if self._stream is None:
            self._jobs.put((peer, list(regions), handle, None))
            return handle
        # Queue the copies now, behind what the caller's stream has already queued. Both
        # devices' current streams are ours while queueing: a cross-device copy runs on
        # the source's and is ordered with the destination's (ATen's copy rule).
        peer_stream = self._peer_stream(peer.device)
        self._stream.wait_stream(torch.cuda.current_stream(self.pool.device))
        landing = self._landing_stream(peer.device)
        with torch.cuda.stream(self._stream), torch.cuda.stream(peer_stream):
            copy_regions(self._local, peer, regions, self.layout.block_bytes, landing)
            done = [torch.cuda.Event(), torch.cuda.Event()]
            done[0].record(self._stream)
            done[1].record(peer_stream)
        self._jobs.put((peer, None, handle, done))
        return handle

    def _landing_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device == self.pool.device:
            return None
        if device not in self._landing_streams:
            self._landing_streams[device] = torch.cuda.Stream(device)
        return self._landing_streams[device]

    def _peer_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device == self.pool.device:
            return self._stream
        if device not in self._peer_streams:
            self._peer_streams[device] = torch.cuda.Stream(device)
        return self._peer_streams[device]

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            peer, regions, handle, events = job
            if events is not None:
                for event in events:
                    event.synchronize()
            elif not handle.is_done:  # not cancelled meanwhile
                copy_regions_host(self._local, peer, regions)
            handle.part_done()

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=10)
        self._peers.clear()
        if self.shm_path is not None and os.path.exists(self.shm_path):
            os.unlink(self.shm_path)  # mappings that are open stay valid
