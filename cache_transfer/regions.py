"""Which bytes move: a request's blocks on the prefill rank -> its blocks on the decode
rank, as (source offset, destination offset, length) byte ranges of the two pools.

Both pools have the layout ``[layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]``
(engine/kv_cache.py), so one block of one layer's K (or V) is ``block_bytes`` contiguous
bytes, and a run of blocks that are consecutive on *both* sides is one range:

    src blocks  [7, 8, 9, 3]     dst blocks  [20, 21, 22, 23]
    runs        (7->20, 3 blocks), (3->23, 1 block)          per layer, for K and for V

The pools may hold different numbers of blocks; everything else must match
(``check_compatible``), which pd-comm's Reserve checks before any byte moves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from engine.kv_cache import KVCacheLayout


class Region(NamedTuple):
    src_offset: int
    dst_offset: int
    nbytes: int


class BlockRun(NamedTuple):
    src_first: int
    dst_first: int
    num_blocks: int


class Regions(Sequence[Region]):
    """Byte regions as three int64 arrays. Planning is vectorised (it runs once per
    layer of every transferred request, thousands of regions for long prompts with
    small blocks); backends that walk regions one by one iterate it like a list."""

    def __init__(self, src_offset: np.ndarray, dst_offset: np.ndarray, nbytes: np.ndarray):
        self.src_offset, self.dst_offset, self.nbytes = src_offset, dst_offset, nbytes

    @classmethod
    def of(cls, regions: Sequence[Region]) -> Regions:
        """``regions`` as arrays (itself when it already is)."""
        if isinstance(regions, Regions):
            return regions
        table = np.array(regions, dtype=np.int64).reshape(-1, 3)
        return cls(table[:, 0], table[:, 1], table[:, 2])

    @classmethod
    def concat(cls, parts: Sequence[Regions]) -> Regions:
        if not parts:
            return cls.of([])
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in Region._fields))

    def __len__(self) -> int:
        return len(self.nbytes)

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        if isinstance(i, slice):
            return Regions(self.src_offset[i], self.dst_offset[i], self.nbytes[i])
        return Region(int(self.src_offset[i]), int(self.dst_offset[i]), int(self.nbytes[i]))

    def __iter__(self) -> Iterator[Region]:
        columns = (self.src_offset.tolist(), self.dst_offset.tolist(), self.nbytes.tolist())
        return (Region(*row) for row in zip(*columns, strict=True))

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum())


class BlockRuns(Sequence[BlockRun]):
    """Runs of blocks consecutive on both sides, as three int64 arrays."""

    def __init__(self, src_first: np.ndarray, dst_first: np.ndarray, num_blocks: np.ndarray):
        self.src_first, self.dst_first, self.num_blocks = src_first, dst_first, num_blocks

    def __len__(self) -> int:
        return len(self.num_blocks)

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return BlockRun(int(self.src_first[i]), int(self.dst_first[i]), int(self.num_blocks[i]))


def block_runs(src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> BlockRuns:
    """Coalesce a block mapping into runs consecutive on both sides."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination")
    src, dst = np.asarray(src_blocks, dtype=np.int64), np.asarray(dst_blocks, dtype=np.int64)
    if len(src) == 0:
        return BlockRuns(src, dst, src)
    # A run starts wherever either side does not continue the previous block.
    starts = np.flatnonzero(np.r_[True, (np.diff(src) != 1) | (np.diff(dst) != 1)])
    lengths = np.diff(np.r_[starts, len(src)])
    return BlockRuns(src[starts], dst[starts], lengths)


def check_compatible(src: KVCacheLayout, dst: KVCacheLayout) -> None:
    """Raise ValueError naming the first field that differs (block counts may differ)."""
    for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype"):
        if getattr(src, name) != getattr(dst, name):
            raise ValueError(
                f"KV layouts differ in {name}: {getattr(src, name)} here, "
                f"{getattr(dst, name)} on the peer"
            )


def _check_runs(runs: BlockRuns, first: np.ndarray, num_blocks: int, side: str) -> None:
    if len(runs) and (first.min() < 0 or (first + runs.num_blocks).max() > num_blocks):
        raise ValueError(f"{side} blocks outside a pool of {num_blocks}")


def layer_regions(src: KVCacheLayout, dst: KVCacheLayout, runs: BlockRuns, layer: int) -> Regions:
    """The byte ranges of one layer's K and V for ``runs`` (KVCacheLayout.region's
    arithmetic on arrays)."""
    _check_runs(runs, runs.src_first, src.num_blocks, "source")
    _check_runs(runs, runs.dst_first, dst.num_blocks, "destination")
    size = src.block_bytes
    parts = []
    for kv in (0, 1):
        src_plane = (layer * 2 + kv) * src.num_blocks
        dst_plane = (layer * 2 + kv) * dst.num_blocks
        src_offset = (src_plane + runs.src_first) * size
        dst_offset = (dst_plane + runs.dst_first) * size
        parts.append(Regions(src_offset, dst_offset, runs.num_blocks * size))
    return Regions.concat(parts)


def head_slice_regions(
    src: KVCacheLayout,
    dst: KVCacheLayout,
    runs: BlockRuns,
    layer: int,
    src_head: int,
    dst_head: int,
    num_heads: int,
) -> Regions:
    """One layer's K and V of ``num_heads`` heads (from local head ``src_head`` here into
    local head ``dst_head`` on the peer) for ``runs``: pools of different TP sizes hold
    different heads per token, so each token's heads are one range (block_size ranges
    per block; blocks whose whole rows match go through ``layer_regions``)."""
    _check_runs(runs, runs.src_first, src.num_blocks, "source")
    _check_runs(runs, runs.dst_first, dst.num_blocks, "destination")
    if src_head < 0 or src_head + num_heads > src.num_kv_heads:
        raise ValueError(f"heads [{src_head}, +{num_heads}) outside {src.num_kv_heads} here")
    if dst_head < 0 or dst_head + num_heads > dst.num_kv_heads:
        raise ValueError(f"heads [{dst_head}, +{num_heads}) outside {dst.num_kv_heads} there")
    # Every block of every run, then every token of each block.
    within = np.arange(int(runs.num_blocks.sum())) - np.repeat(
        np.cumsum(runs.num_blocks) - runs.num_blocks, runs.num_blocks
    )
    src_blocks = np.repeat(runs.src_first, runs.num_blocks) + within
    dst_blocks = np.repeat(runs.dst_first, runs.num_blocks) + within
    tokens = np.arange(src.block_size)
    head_bytes = src.head_dim * src.element_size
    parts = []
    for kv in (0, 1):
        src_rows = ((layer * 2 + kv) * src.num_blocks + src_blocks)[:, None] * src.block_size
        dst_rows = ((layer * 2 + kv) * dst.num_blocks + dst_blocks)[:, None] * dst.block_size
        src_offset = (src_rows + tokens) * (src.num_kv_heads * head_bytes) + src_head * head_bytes
        dst_offset = (dst_rows + tokens) * (dst.num_kv_heads * head_bytes) + dst_head * head_bytes
        nbytes = np.full(src_offset.size, num_heads * head_bytes, dtype=np.int64)
        parts.append(Regions(src_offset.ravel(), dst_offset.ravel(), nbytes))
    return Regions.concat(parts)


def all_regions(
    src: KVCacheLayout, dst: KVCacheLayout, src_blocks: Sequence[int], dst_blocks: Sequence[int]
) -> Regions:
    runs = block_runs(src_blocks, dst_blocks)
    return Regions.concat([layer_regions(src, dst, runs, layer) for layer in range(src.num_layers)])


def dst_block_ranges(dst: KVCacheLayout, dst_blocks: Sequence[int]) -> list[tuple[int, int]]:
    """The destination byte ranges [start, end) that writes into ``dst_blocks`` may touch,
    merged; a receiver accepts writes only inside them."""
    regions = all_regions(dst, dst, dst_blocks, dst_blocks)
    order = np.argsort(regions.dst_offset, kind="stable")
    starts, ends = regions.dst_offset[order], (regions.dst_offset + regions.nbytes)[order]
    if len(starts) == 0:
        return []
    # Merge where a range starts exactly at the previous range's end.
    new = np.r_[True, starts[1:] != ends[:-1]]
    first, last = np.flatnonzero(new), np.r_[np.flatnonzero(new)[1:] - 1, len(starts) - 1]
    return list(zip(starts[first].tolist(), ends[last].tolist(), strict=True))
