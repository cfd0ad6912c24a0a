"""Per-step metadata, set once by the model runner and read by attention layers.

Keeping it in one scoped object means model code passes only hidden states
and positions around (STYLE.md rule 8).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged KV cache.

    T = tokens this step, B = sequences, Q = longest query chunk, C = longest
    context (computed + new tokens). Slots index the flat cache view
    ``[num_blocks * block_size]``: slot = block_id * block_size + offset.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    query_index: torch.Tensor  # [B, Q] int64: token index of each padded query row
    key_slots: torch.Tensor  # [B, C] int64: cache slot of each context position
    attn_mask: torch.Tensor  # [B, 1, Q, C] bool: True where a query may attend
    output_index: torch.Tensor  # [T] int64: row of each real token in the [B*Q] padded output
    logits_index: torch.Tensor  # [S] int64: token index whose logits are sampled


_current: AttentionMetadata | None = None


@contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    global _current
    previous, _current = _current, metadata
    try:
        yield
    finally:
        _current = previous


def get_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention ran outside a forward_context")
    return _current
