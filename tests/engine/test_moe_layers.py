"""MoE layers on CPU without processes: each architecture's router against HF
transformers' own router module; the experts' two layouts over a group of two (each
rank's partial output, summed as the all-reduce would, equals one rank holding all);
the group sizes they refuse; ERNIE's interleaved RoPE as permuted rotate-half RoPE."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.ernie4_5_moe import modeling_ernie4_5_moe
from transformers.models.granitemoe import modeling_granitemoe
from transformers.models.mixtral import modeling_mixtral
from transformers.models.qwen3_moe import modeling_qwen3_moe

from engine.config import RopeConfig
from engine.distributed import ParallelGroup
from engine.layers.fused_moe import FusedMoE
from engine.layers.moe_router import TopKRouter
from engine.layers.rotary import RotaryEmbedding, interleaved_to_halves
from engine.moe_config import MoeConfig

SIZES = {"hidden_size": 32, "num_hidden_layers": 2}
HF_ROUTERS = {
    "qwen3_moe": (
        transformers.Qwen3MoeConfig(**SIZES, num_experts=8, num_experts_per_tok=3,
                                    norm_topk_prob=True, moe_intermediate_size=8),
        modeling_qwen3_moe.Qwen3MoeTopKRouter,
    ),
    "qwen3_moe_unnormalised": (
        transformers.Qwen3MoeConfig(**SIZES, num_experts=8, num_experts_per_tok=3,
                                    norm_topk_prob=False, moe_intermediate_size=8),
        modeling_qwen3_moe.Qwen3MoeTopKRouter,
    ),
    "mixtral": (
        transformers.MixtralConfig(**SIZES, num_local_experts=6, num_experts_per_tok=2),
        modeling_mixtral.MixtralTopKRouter,
    ),
    "granitemoe": (
        transformers.GraniteMoeConfig(**SIZES, num_local_experts=6, num_experts_per_tok=2),
        modeling_granitemoe.GraniteMoeTopKRouter,
    ),
    "ernie4_5_moe": (
        transformers.Ernie4_5_MoeConfig(**SIZES, moe_num_experts=8, moe_k=2,
                                        moe_intermediate_size=8),
        modeling_ernie4_5_moe.Ernie4_5_MoeTopKRouter,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(HF_ROUTERS))
def test_router_matches_hf(name):
    hf_config, hf_class = HF_ROUTERS[name]
    moe = MoeConfig.from_hf(hf_config.to_dict())
    torch.manual_seed(0)
    hf_router = hf_class(hf_config)
    hf_router.weight.data.normal_(0, 0.5)
    ours = TopKRouter(32, moe)
    ours.weight.data.copy_(hf_router.weight.data)
    if moe.has_score_correction_bias:
        bias = torch.randn(1, moe.num_experts) * 0.05
        hf_router.moe_statics.e_score_correction_bias.data.copy_(bias)
        ours.e_score_correction_bias.data.copy_(bias)
    x = torch.randn(40, 32)
    _, hf_weights, hf_ids = hf_router(x)
    weights, ids = ours(x)
    assert torch.equal(ids, hf_ids)
    assert torch.equal(weights, hf_weights.float())


def test_ernie_correction_bias_chooses_but_does_not_weigh():
    moe = MoeConfig(4, 1, 8, (0,), renormalize=False, has_score_correction_bias=True,
                    router_float32=True)  # fmt: skip
    router = TopKRouter(2, moe)
    router.weight.data = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    router.e_score_correction_bias.data = torch.tensor([[0.0, 0.0, 5.0, 0.0]])
    weights, ids = router(torch.tensor([[4.0, 0.0]]))
    probs = torch.softmax(torch.tensor([4.0, 0.0, 0.0, 0.0]), dim=0)
    assert ids.tolist() == [[2]] and weights.tolist() == [[probs[2].item()]]


def fake_group(rank: int, size: int) -> ParallelGroup:
    """A rank's place in a group whose collectives these tests never call."""
    return ParallelGroup(rank, size, backend=object())


def checkpoint_experts(num_experts: int, hidden: int, size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "w1": torch.randn(size, hidden),
            "w3": torch.randn(size, hidden),
            "w2": torch.randn(hidden, size),
        }
        for _ in range(num_experts)
    ]


def load_per_expert(layer: FusedMoE, experts: list[dict[str, torch.Tensor]]) -> None:
    for expert_id, tensors in enumerate(experts):
        for shard, tensor in tensors.items():
            param = layer.w2_weight if shard == "w2" else layer.w13_weight
            param.weight_loader(param, tensor, shard, expert_id)


def load_stacked(layer: FusedMoE, experts: list[dict[str, torch.Tensor]]) -> None:
    """GraniteMoE's layout: [E, 2I, H] (gate rows first) and [E, H, I]."""
    w13 = torch.stack([torch.cat([e["w1"], e["w3"]]) for e in experts])
    layer.w13_weight.weight_loader(layer.w13_weight, w13)
    layer.w2_weight.weight_loader(layer.w2_weight, torch.stack([e["w2"] for e in experts]))


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp-experts", "ep"])
@pytest.mark.parametrize("load", [load_per_expert, load_stacked], ids=["per-expert", "stacked"])
def test_two_ranks_sum_to_one(expert_parallel, load):
    torch.manual_seed(0)
    experts = checkpoint_experts(4, 16, 8)
    whole = FusedMoE(4, 16, 8, ParallelGroup.single(), expert_parallel=False)
    load(whole, experts)
    ranks = [FusedMoE(4, 16, 8, fake_group(r, 2), expert_parallel) for r in range(2)]
    for rank in ranks:
        load(rank, experts)
    shape = (2, 16, 16) if expert_parallel else (4, 8, 16)
    assert all(tuple(rank.w13_weight.shape) == shape for rank in ranks)
    x = torch.randn(10, 16)
    weights, ids = torch.softmax(torch.randn(10, 4), dim=-1).topk(2, dim=-1)
    partials = [rank.forward_torch(x, weights, ids) for rank in ranks]
    torch.testing.assert_close(partials[0] + partials[1], whole.forward_torch(x, weights, ids))
    if expert_parallel:  # rank 1 holds experts 2 and 3 only
        assert torch.equal(ranks[1].w2_weight[0], experts[2]["w2"])
        only_low = ids.max(dim=-1).values < 2
        assert torch.all(partials[1][only_low] == 0)


def test_group_sizes_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match=r"divisible by 4; the model has 6"):
        FusedMoE(6, 16, 8, fake_group(0, 4), expert_parallel=True)
    with pytest.raises(ValueError, match=r"intermediate size \(6\), which is not divisible by 4"):
        FusedMoE(8, 16, 6, fake_group(0, 4), expert_parallel=False)


def test_interleaved_rope_is_rotate_half_over_permuted_dims():
    """HF ERNIE's rotation of q, with its dims then permuted, equals ours on permuted q."""
    head_dim, num_heads = 8, 3
    config = transformers.Ernie4_5_MoeConfig(hidden_size=24, num_attention_heads=num_heads)
    hf_rotary = modeling_ernie4_5_moe.Ernie4_5_MoeRotaryEmbedding(config)
    ours = RotaryEmbedding(head_dim, 64, RopeConfig(theta=config.rope_parameters["rope_theta"]))
    positions = torch.tensor([0, 1, 5, 63])
    q = torch.randn(4, num_heads, head_dim)  # [T, heads, D]
    cos, sin = hf_rotary(q, positions[None])
    hf_q, _ = modeling_ernie4_5_moe.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos, sin
    )
    hf_q = hf_q[0].transpose(0, 1)  # back to [T, heads, D]

    def permute(x: torch.Tensor) -> torch.Tensor:  # each head's dims to rotate-half order
        return interleaved_to_halves(x.reshape(4, -1).T, head_dim).T.reshape(x.shape)

    rotated, _ = ours.forward_torch(positions, permute(q), permute(q))
    torch.testing.assert_close(rotated, permute(hf_q), rtol=1e-6, atol=1e-6)
