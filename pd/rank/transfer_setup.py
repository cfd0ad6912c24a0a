"""A rank's KV-transfer engines, one per protocol it offers: a decode rank receives
(listens, publishes endpoints), a prefill rank sends (connects to decode ranks)."""

from __future__ import annotations

import logging

import torch

from cache_transfer.ipc import IpcTransferEngine, allocate_shared_pool
from cache_transfer.rdma_plan import pick_nic
from cache_transfer.tcp import TcpTransferEngine
from cache_transfer.transfer_engine import TransferEngine
from engine.kv_cache import KVCacheLayout, allocate_kv_cache

logger = logging.getLogger(__name__)


class KVPool:
    """Allocates the engine's KV pool where its peers can reach it: on CPU, a decode
    rank that offers ipc keeps it in shared memory (the prefill rank maps the file)."""

    def __init__(self, role: str, protocols: list[str]):
        self.shared = role == "decode" and "ipc" in protocols
        self.shm_path: str | None = None

    def __call__(self, layout: KVCacheLayout, device: torch.device) -> torch.Tensor:
        if self.shared and device.type == "cpu":
            pool, self.shm_path = allocate_shared_pool(layout)
            return pool
        return allocate_kv_cache(layout, device)


def make_transfer_engines(
    role: str,
    pool: torch.Tensor,
    layout: KVCacheLayout,
    protocols: list[str],
    host: str,
    shm_path: str | None,
    rdma_comm_port: int = 0,
    secret: bytes | None = None,
    session: bytes | None = None,
) -> dict[str, TransferEngine]:
    """``session``: the sending instance's name on tcp streams, the same on all its TP
    ranks (random per engine when None)."""
    receiving = role == "decode"
    engines: dict[str, TransferEngine] = {}
    for protocol in protocols:
        if protocol == "ipc":
            engines[protocol] = IpcTransferEngine(
                pool, layout, shm_path if receiving else None, secret
            )
        elif protocol == "tcp":
            engines[protocol] = TcpTransferEngine(
                pool, layout, host=host, listen=receiving, secret=secret, session=session
            )
        elif protocol == "rdma":
            from cache_transfer.rdma import RdmaTransferEngine

            gpu = pool.device.index or 0
            engines[protocol] = RdmaTransferEngine(
                pool, layout, pick_nic(gpu), comm_port=rdma_comm_port, host=host,
                listen=receiving, secret=secret,
            )  # fmt: skip
    logger.info("KV transfer engines (%s): %s", role, ", ".join(engines))
    return engines
