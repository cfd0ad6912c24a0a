"""Region planning: coalescing, byte math against a per-block copy, compatibility."""

from __future__ import annotations

import random

import pytest
import torch

from cache_transfer.pool_bytes import flat_bytes
from cache_transfer.regions import (
    BlockRun,
    all_regions,
    block_runs,
    check_compatible,
    dst_block_ranges,
)
from engine.kv_cache import KVCacheLayout


def layout(num_blocks: int, dtype: torch.dtype = torch.float16, **kw) -> KVCacheLayout:
    fields = {"num_layers": 3, "block_size": 4, "num_kv_heads": 2, "head_dim": 8} | kw
    return KVCacheLayout(num_blocks=num_blocks, dtype=dtype, **fields)


def test_runs_coalesce_only_when_both_sides_are_consecutive() -> None:
    assert list(block_runs([7, 8, 9, 3], [20, 21, 22, 23])) == [
        BlockRun(7, 20, 3), BlockRun(3, 23, 1),
    ]  # fmt: skip
    assert list(block_runs([1, 2], [5, 9])) == [BlockRun(1, 5, 1), BlockRun(2, 9, 1)]
    assert list(block_runs([], [])) == []
    with pytest.raises(ValueError, match="3 source blocks but 2"):
        block_runs([1, 2, 3], [1, 2])


@pytest.mark.parametrize("seed", range(5))
def test_regions_copy_exactly_the_mapped_blocks(seed: int) -> None:
    rng = random.Random(seed)
    src_layout, dst_layout = layout(40), layout(64)
    src = torch.randn(src_layout.shape).to(torch.float16)
    dst = torch.zeros(dst_layout.shape, dtype=torch.float16)
    n = rng.randint(1, 30)
    src_blocks = sorted(rng.sample(range(40), n)) if seed % 2 else rng.sample(range(40), n)
    dst_blocks = rng.sample(range(64), n)
    src_bytes, dst_bytes = flat_bytes(src), flat_bytes(dst)
    for r in all_regions(src_layout, dst_layout, src_blocks, dst_blocks):
        dst_bytes[r.dst_offset : r.dst_offset + r.nbytes] = src_bytes[
            r.src_offset : r.src_offset + r.nbytes
        ]
    expected = torch.zeros_like(dst)
    expected[:, :, dst_blocks] = src[:, :, src_blocks]
    assert torch.equal(dst, expected)
    allowed = dst_block_ranges(dst_layout, dst_blocks)
    for r in all_regions(src_layout, dst_layout, src_blocks, dst_blocks):
        assert any(a <= r.dst_offset and r.dst_offset + r.nbytes <= b for a, b in allowed)


def test_vectorised_planning_matches_the_layout_arithmetic() -> None:
    src_layout, dst_layout = layout(40), layout(64)
    src_blocks, dst_blocks = [3, 4, 5, 9, 10, 39], [0, 1, 2, 3, 60, 61]
    expected = []
    for layer in range(src_layout.num_layers):
        for kv in (0, 1):
            for s, d, n in [(3, 0, 3), (9, 3, 1), (10, 60, 1), (39, 61, 1)]:
                src_offset, nbytes = src_layout.region(layer, kv, s, n)
                expected.append((src_offset, dst_layout.region(layer, kv, d, n)[0], nbytes))
    regions = all_regions(src_layout, dst_layout, src_blocks, dst_blocks)
    assert sorted(regions) == sorted(expected)
    assert regions[1:3][0] == regions[1] and regions.total_bytes == sum(r[2] for r in expected)
    with pytest.raises(ValueError, match="outside a pool of 40"):
        all_regions(src_layout, dst_layout, [40], [0])


def test_compatibility_names_the_field() -> None:
    check_compatible(layout(10), layout(99))
    with pytest.raises(ValueError, match="head_dim: 8 here, 16 on the peer"):
        check_compatible(layout(10), layout(10, head_dim=16))
    with pytest.raises(ValueError, match="dtype"):
        check_compatible(layout(10), layout(10, dtype=torch.bfloat16))


@pytest.mark.parametrize("scattered", [False, True])
def test_ipc_copy_paths_move_exactly_the_regions(scattered: bool) -> None:
    from cache_transfer.cuda_copy import copy_regions
    from cache_transfer.ipc import copy_regions_host

    src_layout, dst_layout = layout(40), layout(64)
    src = torch.randn(src_layout.shape).to(torch.float16)
    src_blocks = list(range(0, 40, 2)) if scattered else list(range(20))
    dst_blocks = list(range(40, 60))
    regions = all_regions(src_layout, dst_layout, src_blocks, dst_blocks)
    expected = torch.zeros(dst_layout.shape, dtype=torch.float16)
    expected[:, :, dst_blocks] = src[:, :, src_blocks]
    by_tensor = torch.zeros_like(expected)  # gather/scatter (the CUDA path, here on CPU)
    copy_regions(flat_bytes(src), flat_bytes(by_tensor), regions, src_layout.block_bytes)
    by_view = torch.zeros_like(expected)
    copy_regions_host(flat_bytes(src), flat_bytes(by_view), regions)
    assert torch.equal(by_tensor, expected) and torch.equal(by_view, expected)
