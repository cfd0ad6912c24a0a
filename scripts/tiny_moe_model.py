"""The mixture-of-experts parts of the tiny test models (scripts/make_tiny_model.py).

Configs come from transformers' own config classes, so config.json holds every field
HF reads; weights are written under the names of the published checkpoints (one tensor
per expert, or GraniteMoE's stacked experts), which transformers converts on load.

    qwen3_moe     3 layers (the middle one dense), 8 experts, top-2, renormalised
    mixtral       2 layers, 4 experts, top-2
    granitemoe    2 layers, 4 experts, top-2, every multiplier away from 1
    ernie4_5_moe  3 layers (the first dense), 8 experts, top-2, 2 shared experts
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from scripts.make_tiny_model import _WeightSampler

MOE_ARCHS = ("qwen3_moe", "mixtral", "granitemoe", "ernie4_5_moe")
MOE_ARCH_CLASSES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM",
    "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
}
EXPERT_SIZE = 32  # each expert's intermediate size
DENSE_SIZE = 128  # the dense layers' (and Qwen3-MoE's / ERNIE's intermediate_size)
ROUTER_GAIN = 2.0  # router logits of about this spread: clear top-k choices
CORRECTION_BIAS_STD = 0.05  # ERNIE's bias: comparable to the probability gaps


def moe_config(arch: str, common: dict[str, Any]) -> dict[str, Any]:
    """config.json of a tiny ``arch`` model; ``common`` holds the sizes, ids and dtype
    every tiny model shares (make_tiny_model.build_config)."""
    import transformers  # NOTE: lazily: the dense archs need only the dict

    shared = {key: common[key] for key in _SHARED_KEYS}
    shared["dtype"] = common["torch_dtype"]
    if arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **shared, head_dim=32, intermediate_size=DENSE_SIZE, num_hidden_layers=3,
            moe_intermediate_size=EXPERT_SIZE, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, mlp_only_layers=[1],
        )  # fmt: skip
    elif arch == "mixtral":
        config = transformers.MixtralConfig(
            **shared, intermediate_size=EXPERT_SIZE, num_hidden_layers=2, num_local_experts=4,
            num_experts_per_tok=2,
        )  # fmt: skip
    elif arch == "granitemoe":
        config = transformers.GraniteMoeConfig(
            **shared, intermediate_size=EXPERT_SIZE, num_hidden_layers=2, num_local_experts=4,
            num_experts_per_tok=2, embedding_multiplier=4.0, residual_multiplier=0.5,
            attention_multiplier=0.1, logits_scaling=2.0,
        )  # fmt: skip
    elif arch == "ernie4_5_moe":
        config = transformers.Ernie4_5_MoeConfig(
            **shared, intermediate_size=DENSE_SIZE, num_hidden_layers=3,
            moe_intermediate_size=EXPERT_SIZE, moe_num_experts=8, moe_k=2,
            moe_num_shared_experts=2, moe_layer_start_index=1,
        )  # fmt: skip
    else:
        raise ValueError(f"not an MoE arch: {arch!r}")
    out = json.loads(config.to_json_string(use_diff=False))
    out["architectures"] = [MOE_ARCH_CLASSES[arch]]
    return out


_SHARED_KEYS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
    "eos_token_id",
)  # fmt: skip


def is_moe_layer(config: dict[str, Any], layer: int) -> bool:
    """As each HF decoder layer decides whether its MLP is sparse."""
    model_type = config["model_type"]
    if model_type == "qwen3_moe":
        return layer not in config["mlp_only_layers"]
    if model_type == "ernie4_5_moe":
        start, end = config["moe_layer_start_index"], config["moe_layer_end_index"]
        return start <= layer <= end and (layer + 1) % config["moe_layer_interval"] == 0
    return model_type in ("mixtral", "granitemoe")


def moe_mlp_weights(
    config: dict[str, Any], sampler: _WeightSampler, prefix: str, gains: Any
) -> dict[str, torch.Tensor]:
    """One sparse layer's router, experts (and shared experts) under their checkpoint
    names; ``prefix`` is "model.layers.<i>."."""
    model_type = config["model_type"]
    hidden = config["hidden_size"]
    num_experts = config.get("num_experts") or config.get("num_local_experts")
    num_experts = num_experts or config["moe_num_experts"]
    size = config.get("moe_intermediate_size") or config["intermediate_size"]
    router = sampler.linear(num_experts, hidden, ROUTER_GAIN)
    experts = [
        (
            sampler.linear(size, hidden, gains.mlp_gain),
            sampler.linear(size, hidden, gains.mlp_gain),
            sampler.linear(hidden, size, gains.down_gain),
        )
        for _ in range(num_experts)
    ]
    if model_type == "granitemoe":
        block = prefix + "block_sparse_moe."
        return {
            block + "router.layer.weight": router,
            block + "input_linear.weight": torch.stack([torch.cat([g, u]) for g, u, _ in experts]),
            block + "output_linear.weight": torch.stack([d for _, _, d in experts]),
        }
    block = prefix + ("block_sparse_moe." if model_type == "mixtral" else "mlp.")
    names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    weights = {block + "gate.weight": router}
    for e, tensors in enumerate(experts):
        for name, tensor in zip(names, tensors, strict=True):
            weights[f"{block}experts.{e}.{name}.weight"] = tensor
    if model_type == "ernie4_5_moe":
        bias = sampler.normal((1, num_experts), CORRECTION_BIAS_STD)
        weights[block + "moe_statics.e_score_correction_bias"] = bias
        shared = size * config["moe_num_shared_experts"]
        weights[block + "shared_experts.gate_proj.weight"] = sampler.linear(shared, hidden, 1.0)
        weights[block + "shared_experts.up_proj.weight"] = sampler.linear(shared, hidden, 1.0)
        down = sampler.linear(hidden, shared, gains.down_gain)
        weights[block + "shared_experts.down_proj.weight"] = down
    return weights
