"""The KV pool of one rank: one contiguous tensor, so one registration covers it.

Shape ``[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]``.
A transfer unit (layer, K|V, run of consecutive blocks) is therefore one
contiguous byte range; ``KVCacheLayout.region`` gives its offset and length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class KVCacheLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int  # local to this TP rank
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (
            self.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        )

    @cached_property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @cached_property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def bytes_per_block_all_layers(self) -> int:
        return 2 * self.num_layers * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block_all_layers

    def region(self, layer: int, kv: int, first_block: int, num_blocks: int) -> tuple[int, int]:
        """(byte offset, byte length) of blocks [first_block, first_block + num_blocks)
        of ``layer``'s K (kv=0) or V (kv=1) in the pool."""
        if first_block < 0 or first_block + num_blocks > self.num_blocks:
            raise ValueError(f"blocks [{first_block}, +{num_blocks}) outside the pool")
        plane = (layer * 2 + kv) * self.num_blocks
        return (plane + first_block) * self.block_bytes, num_blocks * self.block_bytes


def allocate_kv_cache(layout: KVCacheLayout, device: torch.device | str) -> torch.Tensor:
    # Zeroed so that padded (masked) reads never meet NaN garbage.
    return torch.zeros(layout.shape, dtype=layout.dtype, device=device)
