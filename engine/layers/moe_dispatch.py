"""Tokens to their experts and back, when an MoE group spans DP ranks.

The MoE group holds every ``DP x TP`` rank of an instance; attention runs per DP rank,
so each DP rank has its own tokens (the TP ranks of one DP rank share theirs). Two
forms, one per expert layout of engine/layers/fused_moe.py:

- expert-parallel (``dispatch_to_experts``): each (token, chosen expert) pair travels
  to the rank holding that expert with ``all_to_all``, the expert's output (times the
  routing weight) travels back the same way, and the origin adds a token's pairs up.
  The TP ranks of a DP rank split its pairs between them and all-reduce the sums, so
  no pair is computed twice.
- tensor-sharded (``gather_to_experts``): every rank holds a slice of every expert, so
  every rank needs every token: all-gather the tokens (padded to the longest rank's
  count) with their routing, compute this rank's partial outputs for all of them, and
  reduce-scatter the sums back to their ranks.

A rank with no tokens (a dummy batch of lockstep DP) takes part with zero rows. Counts
are exchanged first (one small collective), so each layer costs one read-back of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.layers.fused_moe import FusedMoE


def dispatch_to_experts(
    moe: FusedMoE, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    group, tp = moe.moe_group, moe.tp
    assert tp is not None
    num_tokens, top_k = topk_ids.shape
    pair_token = torch.arange(num_tokens, device=hidden.device).repeat_interleave(top_k)
    pair_expert = topk_ids.reshape(-1)
    pair_weight = topk_weights.reshape(-1)
    share = torch.arange(pair_token.numel(), device=hidden.device) % tp.size == tp.rank
    order = torch.argsort(pair_expert[share] // moe.num_local_experts, stable=True)
    pair_token, pair_expert = pair_token[share][order], pair_expert[share][order]
    pair_weight = pair_weight[share][order]
    # The rank of each pair's expert; the pairs are grouped by it, in rank order.
    destination = pair_expert // moe.num_local_experts
    send = torch.bincount(destination, minlength=group.size)
    recv = group.all_to_all_rows(send, [1] * group.size, [1] * group.size)
    send_counts, recv_counts = send.tolist(), recv.tolist()
    rows = group.all_to_all_rows(hidden[pair_token], send_counts, recv_counts)
    experts = group.all_to_all_rows(pair_expert, send_counts, recv_counts)
    weights = group.all_to_all_rows(pair_weight, send_counts, recv_counts)
    outputs = moe.local_experts(rows, weights[:, None], experts[:, None])
    returned = group.all_to_all_rows(outputs, recv_counts, send_counts)
    out = torch.zeros_like(hidden)
    out.index_add_(0, pair_token, returned)
    return tp.all_reduce(out)


def gather_to_experts(
    moe: FusedMoE, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    group = moe.moe_group
    num_tokens = hidden.shape[0]
    count = torch.tensor([num_tokens], dtype=torch.int64, device=hidden.device)
    longest = int(group.all_gather_rows(count).max())
    pad = longest - num_tokens
    # Padding rows choose expert 0 with weight 0: they add nothing to anyone.
    hidden_all = group.all_gather_rows(_pad_rows(hidden, pad))
    weights_all = group.all_gather_rows(_pad_rows(topk_weights, pad))
    ids_all = group.all_gather_rows(_pad_rows(topk_ids, pad))
    partial = moe.local_experts(hidden_all, weights_all, ids_all)
    return group.reduce_scatter_rows(partial)[:num_tokens]


def _pad_rows(x: torch.Tensor, num_rows: int) -> torch.Tensor:
    if num_rows == 0:
        return x
    return torch.cat([x, x.new_zeros((num_rows, *x.shape[1:]))])
