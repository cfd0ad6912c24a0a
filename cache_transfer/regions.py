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

from collections.abc import Sequence
from typing import NamedTuple

from engine.kv_cache import KVCacheLayout


class Region(NamedTuple):  # a tuple: planning makes thousands per request
    src_offset: int
    dst_offset: int
    nbytes: int


class BlockRun(NamedTuple):
    src_first: int
    dst_first: int
    num_blocks: int


def block_runs(src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> list[BlockRun]:
    """Coalesce a block mapping into runs consecutive on both sides."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination")
    runs: list[BlockRun] = []
    for src, dst in zip(src_blocks, dst_blocks, strict=True):
        last = runs[-1] if runs else None
        if (
            last is not None
            and src == last.src_first + last.num_blocks
            and dst == last.dst_first + last.num_blocks
        ):
            runs[-1] = BlockRun(last.src_first, last.dst_first, last.num_blocks + 1)
        else:
            runs.append(BlockRun(src, dst, 1))
    return runs


def check_compatible(src: KVCacheLayout, dst: KVCacheLayout) -> None:
    """Raise ValueError naming the first field that differs (block counts may differ)."""
    for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype"):
        if getattr(src, name) != getattr(dst, name):
            raise ValueError(
                f"KV layouts differ in {name}: {getattr(src, name)} here, "
                f"{getattr(dst, name)} on the peer"
            )


def layer_regions(
    src: KVCacheLayout, dst: KVCacheLayout, runs: Sequence[BlockRun], layer: int
) -> list[Region]:
    """The byte ranges of one layer's K and V for ``runs`` (KVCacheLayout.region's
    arithmetic, inlined: this runs once per layer of every transferred request)."""
    size = src.block_bytes
    for run in runs:
        if run.src_first < 0 or run.src_first + run.num_blocks > src.num_blocks:
            raise ValueError(f"source blocks {run} outside a pool of {src.num_blocks}")
        if run.dst_first < 0 or run.dst_first + run.num_blocks > dst.num_blocks:
            raise ValueError(f"destination blocks {run} outside a pool of {dst.num_blocks}")
    regions = []
    for kv in (0, 1):
        src_plane = (layer * 2 + kv) * src.num_blocks
        dst_plane = (layer * 2 + kv) * dst.num_blocks
        regions += [
            Region((src_plane + s) * size, (dst_plane + d) * size, n * size) for s, d, n in runs
        ]
    return regions


def all_regions(
    src: KVCacheLayout, dst: KVCacheLayout, src_blocks: Sequence[int], dst_blocks: Sequence[int]
) -> list[Region]:
    runs = block_runs(src_blocks, dst_blocks)
    return [r for layer in range(src.num_layers) for r in layer_regions(src, dst, runs, layer)]


def dst_block_ranges(dst: KVCacheLayout, dst_blocks: Sequence[int]) -> list[tuple[int, int]]:
    """The destination byte ranges [start, end) that writes into ``dst_blocks`` may touch,
    merged; a receiver accepts writes only inside them."""
    spans = sorted(
        dst.region(layer, kv, run.dst_first, run.num_blocks)
        for layer in range(dst.num_layers)
        for kv in (0, 1)
        for run in block_runs(dst_blocks, dst_blocks)
    )
    merged: list[tuple[int, int]] = []
    for offset, nbytes in spans:
        if merged and merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], offset + nbytes)
        else:
            merged.append((offset, offset + nbytes))
    return merged
