"""The attention backend interface and the choice of backend per device.

A backend turns the step's common paged metadata into what its kernels need
(``prepare``, once per step, or once per captured CUDA graph), rotates the new
q/k and stores the new K/V into the cache, and attends. Models never see which
one runs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, ClassVar

import torch

from engine.forward_context import AttentionMetadata
from engine.kernels import has_triton

if TYPE_CHECKING:
    from engine.layers.attention import Attention
    from engine.layers.rotary import RotaryEmbedding

BACKEND_NAMES = ("auto", "sdpa", "triton")


class AttentionBackend:
    name: ClassVar[str]
    # Decode steps may be captured in a CUDA graph: ``prepare`` then runs once at
    # capture, with ``max_seq_len`` the longest context the graph will ever see, and
    # what it derives lives as long as the graph.
    supports_cuda_graphs: ClassVar[bool] = False

    def prepare(self, meta: AttentionMetadata) -> None:
        """Derive per-step data into ``meta.backend_data`` (shared by all layers)."""

    def rotate_and_store(
        self,
        rotary_emb: RotaryEmbedding,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Rotates q and k by their positions, stores k and v into the cache at
        ``meta.slot_mapping`` and returns the rotated q. q: [T, Hq, D]; k, v: [T, Hk, D],
        all three perhaps rotated or overwritten in place (the caller reads none of them
        again).

        Invariant: the q returned and the k stored are exactly ``rotary_emb(positions, q,
        k)``; a backend may fuse the steps (triton does, in one kernel), never change the
        math. This default is the unfused composition, over ``store_kv``."""
        q, k = rotary_emb(positions, q, k)
        self.store_kv(k, v, k_cache, v_cache, meta)
        return q

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """k, v: [T, Hk, D] into caches of [num_blocks, block_size, Hk, D]. Needed only by
        the default ``rotate_and_store``."""
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
