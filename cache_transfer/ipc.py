"""The ipc backend: two processes of one host.

- CPU pools live in shared memory (``allocate_shared_pool``: a file in /dev/shm); the
  sender maps the receiver's file once and copies regions straight into it (one memcpy
  of memoryview slices per region, the cheapest per-region call Python has; large
  regions through torch's multi-threaded copy). These writes are one-sided: the caller
  must only write into blocks pd-comm reserved for it (the lease bounds how long that
  holds).
- CUDA pools: the receiver pulls (ipc_pull.py says why): the sender hands over its
  pool's CUDA IPC handle once per peer, and each write asks the receiver to copy the
  regions, which it checks against the blocks open for the transfer first.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Sequence

import torch

from cache_transfer.ipc_pull import PullChannel, PullService
from cache_transfer.pool_bytes import flat_bytes, host_view
from cache_transfer.regions import Region, Regions
from cache_transfer.shm_pools import new_pool_path, remove_stale_pools
from cache_transfer.transfer_engine import TransferEngine, TransferError, TransferHandle
from engine.kv_cache import KVCacheLayout

HOST_BULK_COPY_MIN_BYTES = 1 << 20  # regions this large go through torch's copy


def allocate_shared_pool(
    layout: KVCacheLayout, path: str | None = None
) -> tuple[torch.Tensor, str]:
    """A zeroed CPU KV pool backed by a shared-memory file; returns (pool, path).

    NOTE: the file cannot be unlinked right after mapping: a same-host sender opens it
    by path. Its name carries the owner's pid, so pools left by a process that died
    without closing (kill -9) are removed by the next allocation on this host
    (``remove_stale_pools``), and by ``pd-serve cluster`` when it starts or restarts an
    instance."""
    remove_stale_pools()
    path = path or new_pool_path()
    numel = 1
    for size in layout.shape:
        numel *= size
    pool = torch.from_file(path, shared=True, size=numel, dtype=layout.dtype)
    os.chmod(path, 0o600)  # only this user's processes may map (and write) the pool
    return pool.view(layout.shape), path


def copy_regions_host(src: torch.Tensor, dst: torch.Tensor, regions: Sequence[Region]) -> None:
    """CPU: large regions through torch (multi-threaded memcpy), small ones as memoryview
    slice assignments (the cheapest per-call cost)."""
    src_view, dst_view = host_view(src), host_view(dst)
    for r in regions:
        if r.nbytes >= HOST_BULK_COPY_MIN_BYTES:
            dst[r.dst_offset : r.dst_offset + r.nbytes].copy_(
                src[r.src_offset : r.src_offset + r.nbytes]
            )
        else:
            dst_view[r.dst_offset : r.dst_offset + r.nbytes] = src_view[
                r.src_offset : r.src_offset + r.nbytes
            ]


class IpcTransferEngine(TransferEngine):
    protocol = "ipc"

    def __init__(
        self,
        pool: torch.Tensor,
        layout: KVCacheLayout,
        shm_path: str | None = None,
        secret: bytes | None = None,
    ):
        super().__init__(pool, layout)
        self.shm_path = shm_path
        self.secret = secret  # the CUDA pull channel proves it at connect
        self.hostname = socket.gethostname()
        self._local = flat_bytes(pool)
        if pool.is_cuda:
            self._service: PullService | None = PullService(self, self._local, secret)
            self._channels: dict[str, PullChannel] = {}
            return
        self._service = None
        self._peers: dict[str, torch.Tensor] = {}  # flat uint8 views of peer pools
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="ipc-kv", daemon=True)
        self._worker.start()

    def endpoint(self) -> dict:
        if self._service is not None:
            return {"protocol": "ipc", "host": self.hostname, "kind": "cuda",
                    "device": self.pool.device.index, "socket": self._service.name,
                    "nbytes": self._local.numel()}  # fmt: skip
        if self.shm_path is None:
            raise ValueError(
                "receiving over ipc on CPU needs the KV pool in shared memory "
                "(allocate_shared_pool)"
            )
        return {"protocol": "ipc", "host": self.hostname, "kind": "shm",
                "path": self.shm_path, "nbytes": self._local.numel()}  # fmt: skip

    def connect(self, peer_id: str, endpoint: dict) -> None:
        if endpoint.get("host") != self.hostname:
            raise TransferError(
                f"ipc needs both ranks on one host: {peer_id} is on {endpoint.get('host')}, "
                f"this rank on {self.hostname}"
            )
        kind = endpoint["kind"]
        if (kind == "cuda") != self.pool.is_cuda:
            mine = "CUDA" if self.pool.is_cuda else "CPU"
            raise TransferError(f"a {mine} pool cannot write into {peer_id}'s {kind} pool over ipc")
        if self._service is not None:
            if peer_id not in self._channels:
                self._channels[peer_id] = PullChannel(
                    peer_id, endpoint["socket"], self._local, self.secret
                )
            return
        if peer_id in self._peers:
            return
        nbytes = int(endpoint["nbytes"])
        try:
            if os.path.getsize(endpoint["path"]) != nbytes:
                raise TransferError(f"{endpoint['path']} is not {nbytes} bytes")
            self._peers[peer_id] = torch.from_file(
                endpoint["path"], shared=True, size=nbytes, dtype=torch.uint8
            )
        except OSError as e:
            raise TransferError(f"cannot open {peer_id}'s KV pool over ipc: {e}") from e

    def write(self, peer_id: str, transfer_id: bytes, regions: Sequence[Region]) -> TransferHandle:
        if self._service is not None:
            channel = self._channels.get(peer_id)
            if channel is None:
                raise TransferError(f"not connected to {peer_id}")
            stream = torch.cuda.current_stream(self.pool.device)  # produces the bytes
            return channel.pull(transfer_id, Regions.of(regions), stream)
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransferError(f"not connected to {peer_id}")
        handle = TransferHandle(f"ipc write {transfer_id.hex()[:8]} to {peer_id}")
        self._jobs.put((peer, list(regions), handle))
        return handle

    def revoke(self, transfer_id: bytes) -> None:
        super().revoke(transfer_id)
        if self._service is not None:
            self._service.quiesce(transfer_id)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            peer, regions, handle = job
            if not handle.is_done:  # not cancelled meanwhile
                copy_regions_host(self._local, peer, regions)
            handle.part_done()

    def close(self) -> None:
        if self._service is not None:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._service.close()
            return
        self._jobs.put(None)
        self._worker.join(timeout=10)
        self._peers.clear()
        if self.shm_path is not None and os.path.exists(self.shm_path):
            os.unlink(self.shm_path)  # mappings that are open stay valid
