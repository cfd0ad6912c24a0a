"""The CUDA attention backend: Triton kernels that read K/V blocks in place.

Decode-only steps (one query token per sequence) run the split-K decode kernel;
every other step (prefill chunks, prefix hits, mixed batches) runs the prefill
kernel over ``query_start_loc``/``seq_lens``/``block_table``. Nothing is gathered
into padded copies, so memory does not grow with batch x context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.attention.backend import AttentionBackend
from engine.forward_context import AttentionMetadata
from engine.kernels.kv_store import rotary_store_kv
from engine.kernels.paged_attention import (
    decode_num_splits,
    paged_decode_attention,
    paged_prefill_attention,
)

if TYPE_CHECKING:
    from engine.layers.attention import Attention


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, device: torch.device, num_kv_heads: int):
        self.num_kv_heads = num_kv_heads  # local to this TP rank
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 1
        )

    def prepare(self, meta: AttentionMetadata) -> None:
        # Decode: the split count is fixed per step (per graph when captured, where
        # max_seq_len is the longest context the graph will see).
        if meta.is_decode_only:
            meta.backend_data = decode_num_splits(
                meta.num_seqs, meta.max_seq_len, self.num_sms, self.num_kv_heads
            )

    def rotate_and_store(  # type: ignore[no-untyped-def]
        self, rotary_emb, positions, q, k, v, k_cache, v_cache, meta
    ) -> torch.Tensor:
        # One launch: q rotates in place, k rotates on its way into the cache.
        rotary_store_kv(positions, q, k, v, k_cache, v_cache, meta.slot_mapping,
                        rotary_emb.cos_cache, rotary_emb.sin_cache)  # fmt: skip
        return q

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.is_decode_only:
            paged_decode_attention(
                q, k_cache, v_cache, out, meta.seq_lens, meta.block_table, layer.scale,
                meta.backend_data,
            )  # fmt: skip
        else:
            paged_prefill_attention(
                q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_table,
                layer.scale, meta.max_query_len,
            )  # fmt: skip
        return out.view(q.shape[0], -1)
