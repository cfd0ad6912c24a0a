"""Byte views of a KV pool, and the staging a host-side backend needs for GPU pools."""

from __future__ import annotations

import torch


def flat_bytes(pool: torch.Tensor) -> torch.Tensor:
    """The pool as one flat uint8 tensor sharing its memory."""
    return pool.view(torch.uint8).reshape(-1)


def host_view(pool: torch.Tensor) -> memoryview | None:
    """A writable memoryview of a CPU pool (None for a GPU pool)."""
    if pool.device.type != "cpu":
        return None
    return memoryview(flat_bytes(pool).numpy()).cast("B")


class Staging:
    """A pinned host buffer for moving GPU pool bytes through a socket, chunk by chunk."""

    def __init__(self, pool: torch.Tensor, chunk_bytes: int):
        self.flat = flat_bytes(pool)
        self.buffer = torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)
        self.view = memoryview(self.buffer.numpy()).cast("B")

    def load(self, offset: int, nbytes: int) -> memoryview:
        """Copy pool bytes [offset, offset + nbytes) to the host; returns them."""
        self.buffer[:nbytes].copy_(self.flat[offset : offset + nbytes])
        return self.view[:nbytes]

    def store(self, offset: int, nbytes: int) -> None:
        """Copy the first ``nbytes`` of the host buffer into the pool at ``offset``."""
        self.flat[offset : offset + nbytes].copy_(self.buffer[:nbytes])
