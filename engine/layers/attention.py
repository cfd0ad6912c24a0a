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
        self.num_groups = num_heads // num_kv_heads  # query heads per KV head
        # [2, num_blocks, block_size, num_kv_heads, head_dim]; bound by the model runner.
        self.kv_cache: torch.Tensor | None = None
        self.layer_index = 0  # position among the model's attention layers; set with kv_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hk, D] -> [T, Hq * D]."""
        if self.kv_cache is None:
            raise RuntimeError("KV cache not bound to attention layer")
        meta = get_attention_metadata()
        k_cache = self.kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)
        v_cache = self.kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        if meta.on_layer_kv is not None:
            meta.on_layer_kv(self.layer_index)
        return self._attend(q, k_cache, v_cache, meta)

    def _attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_seqs, max_q = meta.query_index.shape
        groups, num_kv_heads, head_dim = self.num_groups, self.num_kv_heads, self.head_dim
        # GQA without copying K/V: query head h uses KV head h // groups, so the
        # groups of one KV head are folded into the query dimension:
        # [B, Q, Hk * G, D] -> [B, Hk, G * Q, D], each fold repeating the mask.
        q_pad = q[meta.query_index].view(num_seqs, max_q, num_kv_heads, groups, head_dim)
        q_pad = q_pad.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, groups * max_q, -1)
        mask = meta.grouped_mask(groups)
        k_ctx = k_cache[meta.key_slots].transpose(1, 2)  # [B, Hk, C, D]
        v_ctx = v_cache[meta.key_slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(q_pad, k_ctx, v_ctx, attn_mask=mask, scale=self.scale)
        # [B, Hk, G * Q, D] -> [B, Q, Hk * G * D] -> real tokens [T, Hq * D]
        out = out.view(num_seqs, num_kv_heads, groups, max_q, head_dim).permute(0, 3, 1, 2, 4)
        out = out.reshape(num_seqs * max_q, self.num_heads * head_dim)
        return out[meta.output_index]
