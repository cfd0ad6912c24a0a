"""Paged attention: write new K/V into cache blocks, then attend over the context.

This is the portable torch path (CPU and CUDA): it gathers each sequence's
context from its blocks into a padded batch and runs SDPA with a mask that
is causal within the query chunk and covers everything computed before it.
Fast fused kernels can replace ``_attend`` without touching models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import AttentionMetadata, get_attention_metadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # [2, num_blocks, block_size, num_kv_heads, head_dim]; bound by the model runner.
        self.kv_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hk, D] -> [T, Hq * D]."""
        if self.kv_cache is None:
            raise RuntimeError("KV cache not bound to attention layer")
        meta = get_attention_metadata()
        k_cache = self.kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)
        v_cache = self.kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        return self._attend(q, k_cache, v_cache, meta)

    def _attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_seqs, max_q = meta.query_index.shape
        q_pad = q[meta.query_index].transpose(1, 2)  # [B, Hq, Q, D]
        k_ctx = k_cache[meta.key_slots].transpose(1, 2)  # [B, Hk, C, D]
        v_ctx = v_cache[meta.key_slots].transpose(1, 2)
        is_gqa = self.num_kv_heads != self.num_heads
        if is_gqa and q.is_cuda:
            # NOTE: CUDA's memory-efficient SDPA takes a mask but not enable_gqa
            # (that pair falls back to the math kernel, which materialises the
            # scores), so KV heads are repeated instead.
            groups = self.num_heads // self.num_kv_heads
            k_ctx = k_ctx.repeat_interleave(groups, dim=1)
            v_ctx = v_ctx.repeat_interleave(groups, dim=1)
            is_gqa = False
        out = F.scaled_dot_product_attention(
            q_pad, k_ctx, v_ctx, attn_mask=meta.attn_mask, scale=self.scale, enable_gqa=is_gqa
        )  # [B, Hq, Q, D]
        out = out.transpose(1, 2).reshape(num_seqs * max_q, self.num_heads * self.head_dim)
        return out[meta.output_index]
