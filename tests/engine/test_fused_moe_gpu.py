"""The fused MoE layer on CUDA at Qwen3-30B-A3B's sizes (hidden 2048, 128 experts, top-8,
expert width 768, bf16): ``forward`` (the Triton grouped GEMM, with the tiles the
engine chooses per batch) against ``forward_torch`` (the experts one by one) on the same
GPU, within bf16 rounding (float32: within fp32 noise); expert-parallel ranks; a
CUDA-graph replay; and a loaded tiny model's sparse block in bf16 against the same
block on the torch path."""

from __future__ import annotations

import pytest
import torch

from engine.distributed import ParallelGroup
from engine.kernels.fused_moe import fused_experts
from engine.layers.fused_moe import FusedMoE

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

HIDDEN, EXPERTS, TOP_K, WIDTH = 2048, 128, 8, 768


def make_layer(num_experts: int = EXPERTS) -> FusedMoE:
    with torch.device("cuda"):
        layer = FusedMoE(num_experts, HIDDEN, WIDTH, ParallelGroup.single(), False)
    layer.w13_weight.data.normal_(0, HIDDEN**-0.5)
    layer.w2_weight.data.normal_(0, WIDTH**-0.5)
    return layer.to(torch.bfloat16)


def route(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(num_tokens, HIDDEN, device="cuda").to(torch.bfloat16)
    probs = torch.softmax(torch.randn(num_tokens, EXPERTS, device="cuda"), dim=-1)
    weights, ids = probs.topk(TOP_K, dim=-1)
    return x, weights / weights.sum(dim=-1, keepdim=True), ids


def assert_close_bf16(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Both round gate/up, SiLU and down to bf16; the sums run in other orders."""
    scale = expected.float().abs().max()
    assert (got.float() - expected.float()).abs().max() <= 2e-2 * scale


@pytest.mark.parametrize("num_tokens", [1, 16, 37, 256, 2048])
def test_fused_layer_matches_the_expert_loop(num_tokens):
    torch.manual_seed(0)
    layer = make_layer()
    x, weights, ids = route(num_tokens)
    assert_close_bf16(layer(x, weights, ids), layer.forward_torch(x, weights, ids))


def test_float32_kernel_is_exact_fp32_not_tf32():
    """float32 runs the kernel too (with IEEE products): within float32 summation noise."""
    torch.manual_seed(3)
    layer = make_layer().float()
    x, weights, ids = route(37)
    x = x.float()
    expected = layer.forward_torch(x, weights, ids)
    got = layer(x, weights, ids)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_expert_parallel_ranks_sum_to_the_whole():
    torch.manual_seed(1)
    whole = make_layer()
    x, weights, ids = route(64)
    total = torch.zeros_like(x, dtype=torch.float32)
    for rank in range(4):
        with torch.device("cuda"):
            part = FusedMoE(EXPERTS, HIDDEN, WIDTH, ParallelGroup(rank, 4, object()), True)
        part = part.to(torch.bfloat16)
        part.w13_weight.data.copy_(whole.w13_weight.data[rank * 32 : (rank + 1) * 32])
        part.w2_weight.data.copy_(whole.w2_weight.data[rank * 32 : (rank + 1) * 32])
        total += fused_experts(x, part.w13_weight, part.w2_weight, weights, ids, rank * 32).float()
    assert_close_bf16(total, whole.forward_torch(x, weights, ids))


def test_fused_layer_replays_in_a_cuda_graph():
    torch.manual_seed(2)
    layer = make_layer()
    x, weights, ids = route(8)
    expected = layer(x, weights, ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, weights, ids)
    x2, weights2, ids2 = route(8)
    for buffer, new in ((x, x2), (weights, weights2), (ids, ids2)):
        buffer.copy_(new)
    graph.replay()
    assert not torch.equal(out, expected)
    assert_close_bf16(out, layer.forward_torch(x, weights, ids))


@pytest.mark.parametrize("arch", ["qwen3_moe", "ernie4_5_moe"])
def test_tiny_model_moe_block_on_cuda_follows_the_torch_path(tiny_model, arch):
    """A loaded sparse block (router, experts, ERNIE's shared experts) in bf16 on the GPU."""
    from engine.weight_loader import load_weights
    from tests.engine.test_weight_loader import build

    model_dir = tiny_model(arch)
    _, model = build(model_dir, "bfloat16")
    load_weights(model, model_dir)
    block = model.model.layers[2].mlp.to("cuda")
    x = torch.randn(37, 64, device="cuda").to(torch.bfloat16)
    fused = block(x)
    block.experts.forward = lambda x, w, ids: block.experts.forward_torch(x, w, ids)
    assert_close_bf16(fused, block(x))
