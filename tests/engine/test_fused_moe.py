"""The Triton grouped-GEMM MoE (engine/kernels/fused_moe.py) against the layer's torch
path (experts one by one), in Triton's interpreter on CPU (on CUDA where there is a
GPU): ragged sizes, experts no token picks, a rank holding only some experts; and the
expert-by-expert alignment it runs on. bfloat16 runs on CUDA only: the interpreter's
tl.dot gives garbage for it (Triton 3.9); float16 stands in for the 16-bit path here."""

from __future__ import annotations

import pytest
import torch

from engine.distributed import ParallelGroup
from engine.layers.fused_moe import FusedMoE

fused_moe = pytest.importorskip("engine.kernels.fused_moe")
pytestmark = pytest.mark.triton

SMALL = fused_moe.MoeTileConfig(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)


def make_experts(
    num_experts: int, hidden: int, size: int, dtype: torch.dtype, device: str
) -> FusedMoE:
    layer = FusedMoE(num_experts, hidden, size, ParallelGroup.single(), expert_parallel=False)
    layer.w13_weight.data.normal_(0, hidden**-0.5)
    layer.w2_weight.data.normal_(0, size**-0.5)
    return layer.to(device=device, dtype=dtype)


def route(num_tokens: int, num_experts: int, top_k: int, device: str):
    logits = torch.randn(num_tokens, num_experts, device=device)
    return torch.softmax(logits, dim=-1).topk(top_k, dim=-1)


BF16_ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="interpreter: no bf16")


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [
        (torch.float32, 1e-5),
        (torch.float16, 2e-3),
        pytest.param(torch.bfloat16, 2e-2, marks=BF16_ON_CUDA),
    ],
    ids=["f32", "f16", "bf16"],
)
@pytest.mark.parametrize(("num_tokens", "top_k"), [(1, 2), (9, 3)])
def test_fused_experts_match_the_expert_loop(device, dtype, tolerance, num_tokens, top_k):
    """H = 40 and I = 24 are not multiples of the 16-wide tiles; 5 experts, some idle."""
    torch.manual_seed(0)
    layer = make_experts(5, 40, 24, dtype, device)
    x = torch.randn(num_tokens, 40, device=device).to(dtype)
    weights, ids = route(num_tokens, 5, top_k, device)
    expected = layer.forward_torch(x, weights, ids)
    got = fused_moe.fused_experts(
        x, layer.w13_weight, layer.w2_weight, weights, ids, 0, SMALL, holds_all_experts=True
    )
    assert got.dtype == dtype and got.shape == expected.shape
    # another summation order; in 16 bits a token's K terms are also added in float32
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_a_rank_computes_only_its_experts(device):
    """Experts 3..5 of 6 on this rank: tokens routed elsewhere get zeros from it."""
    torch.manual_seed(1)
    full = make_experts(6, 32, 16, torch.float32, device)
    mine = make_experts(3, 32, 16, torch.float32, device)
    mine.w13_weight.data.copy_(full.w13_weight.data[3:])
    mine.w2_weight.data.copy_(full.w2_weight.data[3:])
    mine.first_expert = 3
    x = torch.randn(11, 32, device=device)
    weights, ids = route(11, 6, 2, device)
    here = ids >= 3
    expected = full.forward_torch(x, weights * here, ids)  # the others' weights zeroed
    got = fused_moe.fused_experts(x, mine.w13_weight, mine.w2_weight, weights, ids, 3, SMALL)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.forward_torch(x, weights, ids), expected)


def test_align_by_expert_sorts_rows_into_blocks_of_one_expert(device):
    """This rank holds experts 10..12; 19 is another rank's."""
    ids = torch.tensor([[12, 10], [12, 19], [10, 12], [11, 12]], device=device)
    sorted_rows, block_expert = fused_moe.align_by_expert(ids, 3, block_m=4, first_expert=10)
    sorted_rows, block_expert = sorted_rows.cpu(), block_expert.cpu()
    rows = sorted_rows.view(-1, 4).tolist()
    pad = ids.numel()
    assert block_expert.tolist()[:3] == [0, 1, 2]
    assert [sorted(r) for r in rows[:3]] == [[1, 4, pad, pad], [6, pad, pad, pad], [0, 2, 5, 7]]
    assert all(e >= 3 for e in block_expert.tolist()[3:])  # past the end: skipped
    assert all(r == pad for r in sorted_rows.tolist()[12:])


def test_align_by_expert_places_every_row_once_over_many_chunks(device):
    """More rows than one chunk of the kernel (1024), 37 experts, 2 of them idle."""
    torch.manual_seed(0)
    ids = torch.randint(0, 35, (700, 3))
    sorted_rows, block_expert = fused_moe.align_by_expert(ids.to(device), 37, block_m=16)
    sorted_rows, block_expert = sorted_rows.cpu(), block_expert.cpu()
    flat = ids.flatten()
    used = sorted_rows[sorted_rows < flat.numel()].long()
    assert sorted(used.tolist()) == list(range(flat.numel()))
    blocks = sorted_rows.view(-1, 16)
    for block, expert in zip(blocks.tolist(), block_expert.tolist(), strict=True):
        real = [r for r in block if r < flat.numel()]
        assert all(flat[r] == expert for r in real)  # one expert per block
        assert expert < 37 or not real
    # each expert's run is padded only as far as its next multiple of 16
    counts = torch.bincount(flat, minlength=37)
    assert (block_expert < 37).sum() == ((counts + 15) // 16).sum()


def test_the_cpu_takes_the_expert_loop():
    """The parity path: on the CPU the layer is the HF loop (on CUDA, the kernel)."""
    torch.manual_seed(2)
    layer = make_experts(4, 16, 16, torch.float32, "cpu")
    x = torch.randn(3, 16)
    weights, ids = route(3, 4, 2, "cpu")
    assert torch.equal(layer(x, weights, ids), layer.forward_torch(x, weights, ids))
