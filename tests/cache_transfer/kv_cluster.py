"""Shared pieces of the transfer tests: the KV layout both sides use, a deterministic
prefill pool, and the decode side (pd-comm over a real BlockManager and a backend)."""

from __future__ import annotations

import threading

import torch

from cache_transfer.ipc import IpcTransferEngine, allocate_shared_pool
from cache_transfer.pd_comm import PdCommServer, PdCommService
from cache_transfer.tcp import TcpTransferEngine
from engine.kv_cache import KVCacheLayout
from proto import pd_comm_pb2 as pb
from tests.cache_transfer.engine_allocator import EngineBlockAllocator

PREFILL_BLOCKS, DECODE_BLOCKS = 96, 256
BLOCK_SIZE = 4


def layout(num_blocks: int) -> KVCacheLayout:
    return KVCacheLayout(
        num_layers=3, num_blocks=num_blocks, block_size=BLOCK_SIZE, num_kv_heads=2,
        head_dim=16, dtype=torch.bfloat16,
    )  # fmt: skip


def fingerprint(lay: KVCacheLayout, **changes) -> pb.KvFingerprint:
    fields = dict(
        model="tiny", dtype=str(lay.dtype).removeprefix("torch."), block_size=lay.block_size,
        num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim,
        tp_size=1, tp_rank=0, total_kv_heads=lay.num_kv_heads,
    )  # fmt: skip
    return pb.KvFingerprint(**(fields | changes))


def prefill_pool(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layout(PREFILL_BLOCKS).shape, generator=generator).to(torch.bfloat16)


class DecodeSide:
    """pd-comm + one receiving backend + the real block manager, in this process."""

    def __init__(
        self,
        protocol: str,
        lease_s: float = 10.0,
        host: str = "127.0.0.1",
        max_peer_fraction: float = 1.0,  # one sender fills the pool in the transfer tests
    ):
        self.layout = layout(DECODE_BLOCKS)
        self.allocator = EngineBlockAllocator(DECODE_BLOCKS, BLOCK_SIZE)
        if protocol == "ipc":
            self.pool, path = allocate_shared_pool(self.layout)
            self.engine = IpcTransferEngine(self.pool, self.layout, shm_path=path)
        else:
            self.pool = torch.zeros(self.layout.shape, dtype=torch.bfloat16)
            self.engine = TcpTransferEngine(self.pool, self.layout, host=host)
        self.committed: dict[str, tuple[pb.CommitRequest, list[int]]] = {}
        self.lock = threading.Lock()
        self.service = PdCommService(
            "d0", fingerprint(self.layout), self.allocator, {protocol: self.engine},
            self.on_commit, lease_s=lease_s, max_peer_fraction=max_peer_fraction,
        )  # fmt: skip
        self.server = PdCommServer(self.service, host=host)
        self.address = f"{host}:{self.server.port}"

    def on_commit(self, request: pb.CommitRequest, block_ids: list[int]) -> None:
        with self.lock:
            self.committed[request.request_id] = (request, block_ids)

    def close(self) -> None:
        self.server.stop()
        self.engine.close()
