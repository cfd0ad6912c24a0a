"""The attention backend interface and the choice of backend per device.

A backend turns the step's common paged metadata into what its kernels need
(``prepare``, once per step, or once per captured CUDA graph), stores the new
K/V into the cache, and attends. Models never see which one runs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, ClassVar

import torch

from engine.forward_context import AttentionMetadata
from engine.kernels import has_triton

if TYPE_CHECKING:
    from engine.layers.attention import Attention

BACKEND_NAMES = ("auto", "sdpa", "triton")


class AttentionBackend:
    name: ClassVar[str]
    # Decode steps may be captured in a CUDA graph: ``prepare`` then runs once at
    # capture, with ``max_seq_len`` the longest context the graph will ever see.
    supports_cuda_graphs: ClassVar[bool] = False

    def prepare(self, meta: AttentionMetadata) -> None:
        """Derive per-step data into ``meta.backend_data`` (shared by all layers)."""

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """k, v: [T, Hk, D] into caches of [num_blocks, block_size, Hk, D]."""
        raise NotImplementedError

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [T, Hq, D] -> [T, Hq * D], attending over each sequence's cached context."""
        raise NotImplementedError


def select_backend(name: str, device: torch.device, num_kv_heads: int) -> AttentionBackend:
    """``auto``: triton on CUDA when it imports, else sdpa. ``triton`` without CUDA runs
    only under Triton's interpreter (TRITON_INTERPRET=1, for tests)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and has_triton() else "sdpa"
    if name == "sdpa":
        from engine.attention.sdpa import SdpaBackend

        return SdpaBackend()
    if not has_triton():
        raise ValueError("attention backend 'triton' needs the triton package")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"attention backend 'triton' runs on CUDA devices, not {device.type} "
            "(or under TRITON_INTERPRET=1, for tests)"
        )
    from engine.attention.triton_paged import TritonBackend

    return TritonBackend(device, num_kv_heads)
