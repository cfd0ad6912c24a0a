"""Per-step metadata, set once by the model runner and read by attention layers.

Keeping it in one scoped object means model code passes only hidden states
and positions around (STYLE.md rule 8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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
    # Called with an attention layer's index once its new K/V are in the cache (queued
    # on the current stream): a prefill rank sends that layer's blocks while later
    # layers compute.
    on_layer_kv: Callable[[int], None] | None = None
    _group_masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def grouped_mask(self, groups: int) -> torch.Tensor:
        """``attn_mask`` repeated ``groups`` times along Q ([B, 1, G * Q, C]), for
        GQA with query-head groups folded into the query dimension; built once
        per step and shared by every layer."""
        if groups == 1:
            return self.attn_mask
        if groups not in self._group_masks:
            self._group_masks[groups] = self.attn_mask.repeat(1, 1, groups, 1)
        return self._group_masks[groups]


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
