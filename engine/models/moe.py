"""Mixture-of-experts decoders: the Llama-family decoder (engine/models/llama.py) with a
sparse MLP in the layers ``config.moe`` names, the others dense.

- Qwen3-MoE: Qwen3 attention (q/k norms); experts ``mlp.experts.<e>.{gate,up,down}_proj``.
- Mixtral: Llama attention; ``block_sparse_moe.experts.<e>.w1/w3/w2`` (gate/up/down).
- GraniteMoE (PowerMoE): Granite's multipliers; all experts stacked in one tensor each
  (``block_sparse_moe.input_linear`` [E, 2I, H], ``output_linear`` [E, H, I]).
- ERNIE-4.5-MoE: interleaved RoPE, dense leading layers, shared experts, a float32
  router with a score-correction bias (``mlp.moe_statics.e_score_correction_bias``).

The router math of each is in engine/moe_config.py. Routed experts are sharded over
``moe_group`` (the TP group, or every DP x TP rank of the instance; tensor- or
expert-parallel, engine/layers/fused_moe.py); shared experts and dense layers are
sharded over the TP group like any MLP.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from engine.config import ModelConfig
from engine.distributed import ParallelGroup
from engine.layers.fused_moe import FusedMoE
from engine.layers.moe_router import TopKRouter
from engine.models.llama import LlamaForCausalLM, LlamaMLP
from engine.moe_config import MoeConfig


class SparseMoeBlock(nn.Module):
    """Router (``gate``), routed ``experts`` and, where the model has them, the
    ``shared_experts`` every token also runs through."""

    def __init__(
        self,
        config: ModelConfig,
        moe: MoeConfig,
        tp: ParallelGroup,
        moe_group: ParallelGroup,
        expert_parallel: bool,
    ):
        super().__init__()
        self.gate = TopKRouter(config.hidden_size, moe)
        self.experts = FusedMoE(
            moe.num_experts, config.hidden_size, moe.moe_intermediate_size, moe_group,
            expert_parallel, tp,
        )  # fmt: skip
        self.shared_experts = (
            LlamaMLP(config, tp, moe.shared_intermediate_size) if moe.num_shared_experts else None
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(hidden)
        out = self.experts(hidden, weights, expert_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out


class MoeForCausalLM(LlamaForCausalLM):
    """``moe_group``: the group routed experts are sharded over (default: ``tp``);
    ``expert_parallel``: split whole experts over it instead of each expert."""

    # checkpoint projection name of one expert -> its shard of the stacked experts
    expert_weight_names: ClassVar[dict[str, str]] = {
        "gate_proj": "w1",
        "up_proj": "w3",
        "down_proj": "w2",
    }
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()  # (regex, replacement)
    checkpoint_ignored: ClassVar[tuple[str, ...]] = ()  # regexes of tensors we do not use

    def __init__(
        self,
        config: ModelConfig,
        max_position: int,
        tp: ParallelGroup,
        moe_group: ParallelGroup | None = None,
        expert_parallel: bool = False,
    ):
        moe = config.moe
        if moe is None:
            raise ValueError(f"model: {config.architecture} needs an MoE config.json")
        group = tp if moe_group is None else moe_group

        def mlp_for_layer(layer: int) -> nn.Module:
            if moe.is_moe_layer(layer):
                return SparseMoeBlock(config, moe, tp, group, expert_parallel)
            return LlamaMLP(config, tp)

        super().__init__(config, max_position, tp, mlp_for_layer)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    qk_norm: ClassVar[bool] = True


class MixtralForCausalLM(MoeForCausalLM):
    expert_weight_names: ClassVar[dict[str, str]] = {"w1": "w1", "w3": "w3", "w2": "w2"}
    checkpoint_renames = ((r"\.block_sparse_moe\.", ".mlp."),)


class GraniteMoeForCausalLM(MoeForCausalLM):
    checkpoint_renames = (
        (r"\.block_sparse_moe\.input_linear\.weight$", ".mlp.experts.w13_weight"),
        (r"\.block_sparse_moe\.output_linear\.weight$", ".mlp.experts.w2_weight"),
        (r"\.block_sparse_moe\.router\.layer\.", ".mlp.gate."),
    )


class Ernie4_5_MoeForCausalLM(MoeForCausalLM):
    checkpoint_renames = ((r"\.mlp\.moe_statics\.", ".mlp.gate."),)
    checkpoint_ignored = (r"mtp",)  # multi-token-prediction heads (as transformers skips)
