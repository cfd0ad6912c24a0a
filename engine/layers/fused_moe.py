"""The experts of one MoE layer, stacked in two parameters, sharded over an MoE group.

    w13_weight [E_local, 2 * I_local, H]   rows: [gate (w1) | up (w3)] of each expert
    w2_weight  [E_local, H, I_local]       down projection

Two layouts over the ``moe_group`` of n ranks (rank r):

- tensor-sharded (default): every rank holds all E experts, each expert's intermediate
  dim split like the dense MLP under TP (rank r holds rows r*I/n .. of gate and up, the
  same columns of down); each rank's output is a partial sum.
- expert-parallel (``expert_parallel=True``): rank r holds whole experts
  r*E/n .. (r+1)*E/n - 1; each computes its experts' share of every token it sees.

When every rank of the group runs the same tokens (the group is a TP group) the outputs
are all-reduced over it. When the group spans DP ranks, each with its own tokens, they
travel to the experts and back (engine/layers/moe_dispatch.py).

On CUDA the Triton grouped GEMM runs (engine/kernels/fused_moe.py): tokens sorted by
expert, all experts in one launch per projection, nothing read back (so decode steps
replay in CUDA graphs). On the CPU ``forward_torch`` runs the experts one by one, as HF
transformers does: the parity path, and the baseline of benchmarks/moe_bench.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import ParallelGroup
from engine.kernels import can_run_triton


def local_expert_shape(
    num_experts: int, intermediate_size: int, group_size: int, expert_parallel: bool
) -> tuple[int, int]:
    """(experts, intermediate size of each) that one rank of an MoE group of
    ``group_size`` holds; ValueError where the group cannot divide them."""
    if expert_parallel:
        if num_experts % group_size:
            raise ValueError(
                f"expert parallelism over {group_size} ranks needs a number of experts "
                f"divisible by {group_size}; the model has {num_experts}"
            )
        return num_experts // group_size, intermediate_size
    if intermediate_size % group_size:
        raise ValueError(
            f"an MoE group of {group_size} ranks splits each expert's intermediate size "
            f"({intermediate_size}), which is not divisible by {group_size} (expert "
            f"parallelism splits the {num_experts} experts instead)"
        )
    return num_experts, intermediate_size // group_size


class FusedMoE(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        moe_group: ParallelGroup,
        expert_parallel: bool,
        tp: ParallelGroup | None = None,
    ):
        """``tp``: the TP group of this rank when ``moe_group`` spans several DP ranks
        (its ranks run the same tokens; the DP ranks do not)."""
        super().__init__()
        self.num_experts = num_experts
        self.moe_group = moe_group
        self.expert_parallel = expert_parallel
        self.tp = tp if tp is not None and tp.size < moe_group.size else None
        self.num_local_experts, self.local_intermediate_size = local_expert_shape(
            num_experts, intermediate_size, moe_group.size, expert_parallel
        )
        # Global id of this rank's first expert; which slice of each expert it holds.
        self.first_expert = moe_group.rank * self.num_local_experts if expert_parallel else 0
        self.intermediate_rank = 0 if expert_parallel else moe_group.rank
        size = self.local_intermediate_size
        self.w13_weight = nn.Parameter(
            torch.empty(self.num_local_experts, 2 * size, hidden_size), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(self.num_local_experts, hidden_size, size), requires_grad=False
        )
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        # Tokens routed to each (global) expert from this rank's tokens since start; on
        # the device, read only when the engine reports its stats.
        self.register_buffer(
            "expert_tokens", torch.zeros(num_experts, dtype=torch.int64), persistent=False
        )
        self._loaded: set[tuple[int, str]] = set()  # (local expert, shard) loaded so far

    # -- loading ---------------------------------------------------------------------

    def weight_loader(
        self,
        param: nn.Parameter,
        loaded: torch.Tensor,
        shard_id: str | None = None,
        expert_id: int | None = None,
    ) -> None:
        """One expert's projection (``shard_id`` "w1" gate or "w3" up [I, H], "w2" down
        [H, I]; ``expert_id`` global), or, with neither, all experts of this parameter
        stacked as HF stores them ([E, 2I, H] gate rows first, or [E, H, I]). Copies in
        this rank's experts and slice; another rank's expert is skipped."""
        if expert_id is None:
            if shard_id is not None or loaded.size(0) != self.num_experts:
                raise ValueError(
                    f"MoE: a stacked expert tensor needs {self.num_experts} experts; got "
                    f"shape {tuple(loaded.shape)} (shard {shard_id})"
                )
            for local in range(self.num_local_experts):
                expert = loaded[self.first_expert + local]
                if param is self.w2_weight:
                    self._load_expert(param, expert, "w2", local)
                else:
                    gate, up = expert.chunk(2, dim=0)
                    self._load_expert(param, gate, "w1", local)
                    self._load_expert(param, up, "w3", local)
            return
        local = expert_id - self.first_expert
        if 0 <= local < self.num_local_experts:
            self._load_expert(param, loaded, shard_id, local)

    def missing_experts(self) -> list[str]:
        """The (global) expert shards not loaded yet; the weight loader checks none is."""
        return [
            f"expert {self.first_expert + local} {shard}"
            for local in range(self.num_local_experts)
            for shard in ("w1", "w3", "w2")
            if (local, shard) not in self._loaded
        ]

    def _load_expert(self, param: nn.Parameter, loaded: torch.Tensor, shard_id, local: int):  # type: ignore[no-untyped-def]
        self._loaded.add((local, shard_id))
        size = self.local_intermediate_size
        start = self.intermediate_rank * size
        if shard_id == "w2":
            param.data[local].copy_(loaded.narrow(1, start, size))
        elif shard_id in ("w1", "w3"):
            offset = 0 if shard_id == "w1" else size
            param.data[local, offset : offset + size].copy_(loaded.narrow(0, start, size))
        else:
            raise ValueError(f"MoE: unknown expert shard {shard_id!r} (w1, w2 or w3)")

    # -- forward ---------------------------------------------------------------------

    def forward(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, H]; the router's choice per token: topk_weights [T, K] (float32)
        and topk_ids [T, K] (global expert ids) -> sum of the chosen experts' outputs
        times their weights [T, H], summed over the MoE group. T may be 0: a DP rank
        with nothing to run still takes part in the group's collectives."""
        ids = topk_ids.reshape(-1).long()  # NOTE: not bincount, which syncs on CUDA
        self.expert_tokens.scatter_add_(0, ids, torch.ones_like(ids))
        if self.tp is not None:  # the group spans DP ranks: tokens go to the experts
            from engine.layers import moe_dispatch

            if self.expert_parallel:
                return moe_dispatch.dispatch_to_experts(self, hidden, topk_weights, topk_ids)
            return moe_dispatch.gather_to_experts(self, hidden, topk_weights, topk_ids)
        return self.moe_group.all_reduce(self.local_experts(hidden, topk_weights, topk_ids))

    def local_experts(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """This rank's share of ``forward``: its experts (or slices of them), no
        collective; ids of experts held elsewhere contribute nothing."""
        if can_run_triton(hidden):
            from engine.kernels import fused_moe  # NOTE: lazily: CPU-only installs lack triton

            return fused_moe.fused_experts(
                hidden, self.w13_weight, self.w2_weight, topk_weights, topk_ids,
                self.first_expert, holds_all_experts=not self.expert_parallel,
            )  # fmt: skip
        return self.forward_torch(hidden, topk_weights, topk_ids)

    def forward_torch(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """This rank's experts one by one, in expert order (HF transformers' loop, so
        each token's terms add up in its order), without the all-reduce."""
        out = torch.zeros_like(hidden)
        local_ids = topk_ids - self.first_expert
        # NOTE: one read-back per layer; this path serves the CPU and the baseline.
        hit = torch.unique(local_ids[(local_ids >= 0) & (local_ids < self.num_local_experts)])
        for expert in hit.tolist():
            token_index, slot = torch.where(local_ids == expert)
            gate, up = F.linear(hidden[token_index], self.w13_weight[expert]).chunk(2, dim=-1)
            x = F.linear(F.silu(gate) * up, self.w2_weight[expert])
            x = x * topk_weights[token_index, slot, None]
            out.index_add_(0, token_index, x.to(out.dtype))
        return out
