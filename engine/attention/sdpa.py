"""The portable attention backend (CPU and CUDA), our exact-parity reference.

It gathers each sequence's context from its blocks into a padded batch and runs
torch's SDPA with a mask that is causal within the query chunk and covers
everything computed before it. Simple and exact, but the gathered copy grows with
batch x context: the triton backend reads blocks in place instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.attention.backend import AttentionBackend
from engine.forward_context import AttentionMetadata

if TYPE_CHECKING:
    from engine.layers.attention import Attention

# NOTE: cuDNN's SDPA builds a graph per shape, and the context length changes
# every decode step; the other backends take our masks without that cost.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class PaddedBatch:
    """The step's tokens as padded [B, Q] query rows over [B, C] context columns
    (Q = longest query chunk, C = longest context)."""

    query_index: torch.Tensor  # [B, Q] int64: token index of each padded query row
    key_slots: torch.Tensor  # [B, C] int64: cache slot of each context position
    attn_mask: torch.Tensor  # [B, 1, Q, C] bool: True where a query may attend
    output_index: torch.Tensor  # [T] int64: row of each real token in the [B*Q] padded output
    group_masks: dict[int, torch.Tensor]

    def grouped_mask(self, groups: int) -> torch.Tensor:
        """``attn_mask`` repeated ``groups`` times along Q ([B, 1, G * Q, C]), for GQA
        with query-head groups folded into the query dimension; built once per step."""
        if groups == 1:
            return self.attn_mask
        if groups not in self.group_masks:
            self.group_masks[groups] = self.attn_mask.repeat(1, 1, groups, 1)
        return self.group_masks[groups]


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def prepare(self, meta: AttentionMetadata) -> None:
        meta.backend_data = _padded_batch(meta)

    def store_kv(self, k, v, k_cache, v_cache, meta) -> None:  # type: ignore[no-untyped-def]
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        padded: PaddedBatch = meta.backend_data
        num_seqs, max_q = padded.query_index.shape
        groups, num_kv_heads, head_dim = layer.num_groups, layer.num_kv_heads, layer.head_dim
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        # GQA without copying K/V: query head h uses KV head h // groups, so the
        # groups of one KV head are folded into the query dimension:
        # [B, Q, Hk * G, D] -> [B, Hk, G * Q, D], each fold repeating the mask.
        q_pad = q[padded.query_index].view(num_seqs, max_q, num_kv_heads, groups, head_dim)
        q_pad = q_pad.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, groups * max_q, -1)
        mask = padded.grouped_mask(groups)
        k_ctx = k_flat[padded.key_slots].transpose(1, 2)  # [B, Hk, C, D]
        v_ctx = v_flat[padded.key_slots].transpose(1, 2)
        with sdpa_kernel(_SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(
                q_pad, k_ctx, v_ctx, attn_mask=mask, scale=layer.scale
            )
        # [B, Hk, G * Q, D] -> [B, Q, Hk * G * D] -> real tokens [T, Hq * D]
        out = out.view(num_seqs, num_kv_heads, groups, max_q, head_dim).permute(0, 3, 1, 2, 4)
        out = out.reshape(num_seqs * max_q, layer.num_heads * head_dim)
        return out[padded.output_index]


def _padded_batch(meta: AttentionMetadata) -> PaddedBatch:
    device = meta.seq_lens.device
    num_seqs, num_tokens = meta.num_seqs, meta.num_tokens
    max_q, max_ctx = meta.max_query_len, meta.max_seq_len
    q_offsets = meta.query_start_loc[:-1].long()  # first token index of each sequence
    q_lens = meta.query_start_loc[1:].long() - q_offsets
    ctx_lens = meta.seq_lens.long()
    starts = ctx_lens - q_lens  # tokens computed before this step
    block_tables = meta.block_table.long()

    seq_of_token = torch.repeat_interleave(
        torch.arange(num_seqs, device=device), q_lens, output_size=num_tokens
    )
    local = torch.arange(num_tokens, device=device) - q_offsets[seq_of_token]

    row = torch.arange(max_q, device=device).unsqueeze(0)  # [1, Q]
    valid_q = row < q_lens.unsqueeze(1)  # [B, Q]
    query_index = q_offsets.unsqueeze(1) + torch.where(valid_q, row, 0)
    col = torch.arange(max_ctx, device=device).unsqueeze(0)  # [1, C]
    # Columns past a sequence's context read its position 0 (masked anyway).
    key_positions = torch.where(col < ctx_lens.unsqueeze(1), col, 0).expand(num_seqs, max_ctx)
    block_size = meta.block_size
    blocks = block_tables.gather(1, key_positions // block_size)
    key_slots = blocks * block_size + key_positions % block_size
    q_positions = starts.unsqueeze(1) + row  # [B, Q]
    causal = col.unsqueeze(1) <= q_positions.unsqueeze(2)  # [B, Q, C]
    # Padding rows attend to column 0 only, so softmax never sees an empty row.
    pad_rows = (~valid_q).unsqueeze(2) & (col.unsqueeze(1) == 0)
    attn_mask = torch.where(valid_q.unsqueeze(2), causal, pad_rows).unsqueeze(1)
    return PaddedBatch(
        query_index=query_index,
        key_slots=key_slots,
        attn_mask=attn_mask,
        output_index=seq_of_token * max_q + local,
        group_masks={},
    )
