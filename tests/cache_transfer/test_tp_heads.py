"""KV between instances of different TP sizes: which heads each prefill rank writes where
(tp_heads) and the byte ranges that carry them (head_slice_regions), checked by moving
bytes between real pools and comparing every decode rank's heads with the model's."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from cache_transfer.regions import block_runs, head_slice_regions
from cache_transfer.tp_heads import HeadWrite, head_writes, rank_heads
from engine.kv_cache import KVCacheLayout

LAYERS, BLOCK_SIZE, HEAD_DIM = 2, 4, 3


def test_rank_heads_split_then_replicate():
    assert [rank_heads(4, 2, r) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert [rank_heads(2, 4, r) for r in range(4)] == [range(0, 1)] * 2 + [range(1, 2)] * 2
    with pytest.raises(ValueError, match="does not divide"):
        rank_heads(4, 3, 0)
    with pytest.raises(ValueError, match="do not divide"):
        rank_heads(4, 6, 0)


def test_head_writes_of_the_docstring_examples():
    assert head_writes(2, 2, 1, 1) == [HeadWrite(0, 0, 1, 1)]  # P1 head 1 -> D0 local 1
    assert head_writes(2, 1, 0, 2) == [HeadWrite(0, 0, 0, 1), HeadWrite(1, 1, 0, 1)]
    assert head_writes(2, 4, 1, 1) == []  # a second holder of head 0 writes nothing


def test_equal_tp_pairs_rank_with_rank_even_with_replicated_heads():
    for rank in range(4):  # 2 KV heads on 4 ranks: each head held twice on both sides
        assert head_writes(2, 4, rank, 4) == [HeadWrite(rank, 0, 0, 1)]
    # 4 -> 2 over 2 heads: the copies share the work (P0 -> D0, P3 -> D1)
    assert [head_writes(2, 4, r, 2) for r in range(4)] == [
        [HeadWrite(0, 0, 0, 1)],
        [],
        [],
        [HeadWrite(1, 0, 0, 1)],
    ]


def layout(num_blocks: int, heads: int) -> KVCacheLayout:
    return KVCacheLayout(LAYERS, num_blocks, BLOCK_SIZE, heads, HEAD_DIM, torch.float32)


def move(src: torch.Tensor, dst: torch.Tensor, regions) -> None:  # type: ignore[no-untyped-def]
    src_bytes, dst_bytes = src.view(-1).view(torch.uint8), dst.view(-1).view(torch.uint8)
    for region in regions:
        s, d, n = region
        dst_bytes[d : d + n] = src_bytes[s : s + n]


@pytest.mark.parametrize(
    ("total", "src_tp", "dst_tp"),
    [(t, s, d) for t in (2, 4) for s, d in itertools.product((1, 2, 4, 8), repeat=2) if s != d],
)
def test_every_decode_rank_gets_exactly_its_heads(total, src_tp, dst_tp):
    """The model's KV [layers, 2, blocks, block_size, heads, dim] split over prefill ranks,
    written into decode ranks of another TP size: each decode rank then holds its heads
    in the blocks it reserved, and nothing else was touched."""
    rng = np.random.default_rng(0)
    src_blocks, dst_blocks = [3, 4, 7, 1], [9, 10, 2, 5]
    full = torch.from_numpy(rng.standard_normal((LAYERS, 2, 8, BLOCK_SIZE, total, HEAD_DIM)))
    full = full.float()
    runs = block_runs(src_blocks, dst_blocks)

    def shard(tp: int, rank: int) -> range:
        return rank_heads(total, tp, rank)

    src_pools = [full[..., shard(src_tp, r), :].contiguous() for r in range(src_tp)]
    dst_pools = [
        torch.full((LAYERS, 2, 12, BLOCK_SIZE, len(shard(dst_tp, r)), HEAD_DIM), -1.0)
        for r in range(dst_tp)
    ]
    for rank, pool in enumerate(src_pools):
        here = layout(8, pool.shape[4])
        for write in head_writes(total, src_tp, rank, dst_tp):
            there = dataclasses.replace(
                here, num_blocks=12, num_kv_heads=dst_pools[write.dst_rank].shape[4]
            )
            for layer in range(LAYERS):
                regions = head_slice_regions(
                    here, there, runs, layer, write.src_first, write.dst_first, write.count
                )
                move(pool, dst_pools[write.dst_rank], regions)
    for rank, pool in enumerate(dst_pools):
        expected = full[:, :, src_blocks][..., shard(dst_tp, rank), :]
        assert torch.equal(pool[:, :, dst_blocks], expected), f"decode rank {rank}"
        untouched = [b for b in range(12) if b not in dst_blocks]
        assert bool((pool[:, :, untouched] == -1.0).all())


def test_head_ranges_are_checked():
    here, there = layout(8, 2), layout(8, 1)
    runs = block_runs([0], [0])
    with pytest.raises(ValueError, match="outside 1 there"):
        head_slice_regions(here, there, runs, 0, 0, 0, 2)
    with pytest.raises(ValueError, match="destination blocks outside"):
        head_slice_regions(here, there, block_runs([0], [8]), 0, 0, 0, 1)
