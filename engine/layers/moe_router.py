"""The router of an MoE layer: which top-k experts each token goes to, with what weight.

The math is HF transformers' for each architecture (the table in engine/moe_config.py),
op for op, so float32 routing choices match the reference. Replicated on every rank
(E x H is small); every rank of a group computes the same choice.

NOTE: the weights come back in float32 for every architecture. HF casts them to the
model dtype first for all but Mixtral; in float32 that is the same, and in 16-bit the
experts' kernel multiplies in float32 anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.linear import linear
from engine.moe_config import MoeConfig


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, moe: MoeConfig):
        super().__init__()
        self.moe = moe
        # ERNIE keeps its router (and bias) in float32 whatever the model dtype.
        dtype = torch.float32 if moe.router_float32 else None
        self.weight = nn.Parameter(
            torch.empty(moe.num_experts, hidden_size, dtype=dtype), requires_grad=False
        )
        if moe.has_score_correction_bias:
            # [1, E] as ERNIE's checkpoints store it (one group of experts)
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(1, moe.num_experts, dtype=torch.float32), requires_grad=False
            )

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> (weights [T, K] float32, expert ids [T, K] int64)."""
        moe = self.moe
        logits = linear(hidden.to(self.weight.dtype), self.weight).float()  # [T, E]
        if not moe.softmax_before_topk:  # Granite
            top_logits, ids = logits.topk(moe.top_k, dim=-1)
            return torch.softmax(top_logits, dim=-1), ids
        probs = torch.softmax(logits, dim=-1)
        if moe.has_score_correction_bias:  # ERNIE: the bias picks, the probs weigh
            _, ids = torch.topk(probs + self.e_score_correction_bias.squeeze(), moe.top_k, dim=-1)
            weights = torch.gather(probs, dim=-1, index=ids)
        else:
            weights, ids = torch.topk(probs, moe.top_k, dim=-1)
        if moe.renormalize:
            weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=moe.norm_min)
        return weights, ids
