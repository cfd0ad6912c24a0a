"""Paged attention layer: rotate the step's new q/k, store its new K/V into cache blocks,
then attend.

The step's attention backend (sdpa or triton, carried by the forward context's
metadata) does all three (rotary and the store may be one kernel); the layer only owns
its slice of the KV pool.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.forward_context import get_attention_metadata
from engine.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_groups = num_heads // num_kv_heads  # query heads per KV head
        # [2, num_blocks, block_size, num_kv_heads, head_dim]; bound by the model runner.
        self.kv_cache: torch.Tensor | None = None
        self.layer_index = 0  # position among the model's attention layers; set with kv_cache

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotary_emb: RotaryEmbedding,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hk, D], not yet rotated (``rotary_emb`` at
        ``positions`` [T] does that; q, k, v may be overwritten) -> [T, Hq * D]."""
        if self.kv_cache is None:
            raise RuntimeError("KV cache not bound to attention layer")
        if q.shape[0] == 0:  # a dummy batch (lockstep DP): nothing to store or attend
            return q.new_empty((0, self.num_heads * self.head_dim))
        meta = get_attention_metadata()
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        q = meta.backend.rotate_and_store(rotary_emb, positions, q, k, v, k_cache, v_cache, meta)
        if meta.on_layer_kv is not None:
            meta.on_layer_kv(self.layer_index)
        return meta.backend.forward(self, q, k_cache, v_cache, meta)
