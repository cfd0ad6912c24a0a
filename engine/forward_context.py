"""Per-step attention metadata, set once by the model runner and read by attention layers.

Keeping it in one scoped object means model code passes only hidden states
and positions around (STYLE.md rule 8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.attention.backend import AttentionBackend


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged KV cache: the common paged form
    every attention backend reads.

    T = tokens this step (flattened sequence by sequence), B = sequences. Sequence b
    owns tokens ``query_start_loc[b]:query_start_loc[b + 1]``; its context (computed
    tokens plus this step's) is ``seq_lens[b]`` long, so its new tokens sit at positions
    ``seq_lens[b] - q_len_b ...``. Slots index the flat cache view
    ``[num_blocks * block_size]``: slot = block_id * block_size + offset, and a
    negative slot marks a padding token whose K/V are not stored.
    """

    num_tokens: int  # host copies of sizes: reading them off the device would sync
    num_seqs: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    logits_index: torch.Tensor  # [S] int64: token index whose logits are sampled
    backend: AttentionBackend
    # Called with an attention layer's index once its new K/V are in the cache (queued
    # on the current stream): a prefill rank sends that layer's blocks while later
    # layers compute.
    on_layer_kv: Callable[[int], None] | None = None
    backend_data: Any = None  # what the backend derives once per step (``prepare``)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


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
