"""Mixture-of-experts as two grouped GEMMs: tokens sorted by expert, one launch each for
gate/up (with SiLU * up fused in) and for down (times the routing weight).

Each token t picks K experts; row r = t * K + k of the work is (token t, its k-th
expert). ``align_by_expert`` sorts the rows by expert and pads each expert's run to a
multiple of BLOCK_M, so every block of BLOCK_M sorted rows belongs to one expert:

    sorted_rows   [ e0 e0 e0 pad | e2 e2 e2 e2 | e2 pad pad pad | ... | (unused) ]
    block_expert  [      0       |      2      |       2        | ... | E  (skip) ]

A program computes a BLOCK_M x BLOCK_N tile of one block: its rows gather their
inputs (the token's hidden row for gate/up; row r of the intermediate for down) and
multiply by that expert's weight slice. Pad rows (value T * K) load zeros and store
nothing; blocks of expert id >= E (past the end, or rows of experts another rank
holds) return at once. The launch grid is sized from an upper bound on the padded
length, so nothing is read back to the host.

Rounding follows the torch path (engine/layers/fused_moe.py, ``forward_torch``):
gate and up are rounded to the activation dtype before SiLU, the SiLU is rounded
before the product, and the down projection is rounded before the routing weight.
The K rows of a token are summed by torch at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class MoeTileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def choose_config(num_rows: int, num_experts: int) -> MoeTileConfig:
    """Tiles by the expected rows per expert: few (decode) wastes little on 16-row
    blocks; many fill 64-row blocks."""
    rows_per_expert = num_rows / max(1, num_experts)
    if rows_per_expert <= 16:
        return MoeTileConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:
        return MoeTileConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    return MoeTileConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


def align_by_expert(
    expert_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, K] (local ids; outside 0..num_experts-1: not this rank's) ->
    (sorted_rows [P] int32, block_expert [P / block_m] int32), laid out as the module
    docstring draws; P bounds the padded length from above."""
    flat = expert_ids.flatten().to(torch.int64)
    num_rows = flat.numel()
    device = flat.device
    # Rows of other ranks' experts go to bucket E, which gets no blocks.
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)  # where each expert's padded run ends
    # At most min(E, rows) experts are used, each padding fewer than block_m rows.
    max_len = num_rows + min(num_experts, num_rows) * (block_m - 1)
    max_len = (max_len + block_m - 1) // block_m * block_m
    order = torch.sort(flat, stable=True).indices  # rows grouped by expert, in row order
    sorted_experts = flat[order]
    run_starts = torch.cumsum(counts, 0) - counts  # where each expert's rows begin in order
    rank_in_run = torch.arange(num_rows, device=device) - run_starts[sorted_experts]
    padded_starts = torch.cat([ends.new_zeros(1), ends])  # bucket E starts at the end
    target = padded_starts[sorted_experts] + rank_in_run
    target = torch.where(sorted_experts < num_experts, target, max_len)  # dropped
    sorted_rows = torch.full((max_len + 1,), num_rows, dtype=torch.int32, device=device)
    sorted_rows.scatter_(0, target, order.to(torch.int32))
    block_starts = torch.arange(0, max_len, block_m, device=device)
    block_expert = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)
    return sorted_rows[:max_len], block_expert


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, out_ptr, sorted_rows_ptr, block_expert_ptr,
    num_rows, num_experts, hidden_size, intermediate_size,
    stride_x, stride_we, stride_wn, stride_out,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # out[r, n] = silu(x[r // K] . w[e, n]) * (x[r // K] . w[e, I + n]) for one block's rows.
    num_n = tl.cdiv(intermediate_size, BLOCK_N)
    block = tl.program_id(0) // num_n
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    if expert >= num_experts:
        return
    rows = tl.load(sorted_rows_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < num_rows
    n = (tl.program_id(0) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < intermediate_size
    k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (rows // TOP_K)[:, None] * stride_x + k[None, :]
    # NOTE: int64 offsets: expert * stride_we passes 2^31 elements in large models.
    gate_ptrs = w_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None]
    up_ptrs = gate_ptrs + intermediate_size * stride_wn
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_mask = k < hidden_size - k0
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        gate = tl.dot(x, tl.load(gate_ptrs, mask=w_mask, other=0.0), gate)
        up = tl.dot(x, tl.load(up_ptrs, mask=w_mask, other=0.0), up)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    gate = gate.to(dtype).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    out = silu * up.to(dtype).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None] * stride_out + n[None, :]
    tl.store(out_ptrs, out.to(dtype), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, out_ptr, weights_ptr, sorted_rows_ptr, block_expert_ptr,
    num_rows, num_experts, hidden_size, intermediate_size,
    stride_h, stride_we, stride_wn, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # out[r, n] = weight[r] * (h[r] . w[e, n]) for one block's rows; n over hidden_size.
    num_n = tl.cdiv(hidden_size, BLOCK_N)
    block = tl.program_id(0) // num_n
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    if expert >= num_experts:
        return
    rows = tl.load(sorted_rows_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < num_rows
    n = (tl.program_id(0) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < hidden_size
    k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_h + k[None, :]
    w_ptrs = w_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, intermediate_size, BLOCK_K):
        k_mask = k < intermediate_size - k0
        h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(h, w, acc)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    out = acc.to(dtype).to(tl.float32) * weight[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_out + n[None, :]
    tl.store(out_ptrs, out.to(dtype), mask=row_mask[:, None] & n_mask[None, :])


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    first_expert: int = 0,
    config: MoeTileConfig | None = None,
) -> torch.Tensor:
    """hidden [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; the
    router's topk_weights [T, K] and topk_ids [T, K] (global ids; this rank holds
    experts first_expert .. first_expert + E - 1) -> [T, H]: the sum over each token's
    experts held here of weight * down(silu(gate) * up)."""
    num_tokens, hidden_size = hidden.shape
    num_experts, double_size, _ = w13.shape
    size = double_size // 2
    top_k = topk_ids.shape[1]
    if (
        w13.shape[2] != hidden_size
        or w2.shape != (num_experts, hidden_size, size)
        or topk_weights.shape != topk_ids.shape
        or topk_ids.shape[0] != num_tokens
        or any(x.stride(-1) != 1 for x in (hidden, w13, w2))
        or w13.stride(1) != hidden_size
        or w2.stride(1) != size
    ):
        raise ValueError(
            f"fused_experts needs hidden [T, H], w13 [E, 2I, H] and w2 [E, H, I] with "
            f"contiguous rows, topk weights and ids [T, K]; got hidden "
            f"{tuple(hidden.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, "
            f"weights {tuple(topk_weights.shape)}, ids {tuple(topk_ids.shape)}"
        )
    num_rows = num_tokens * top_k
    out_rows = torch.zeros(num_rows, hidden_size, dtype=hidden.dtype, device=hidden.device)
    if num_rows == 0:
        return out_rows.view(num_tokens, hidden_size)
    config = config or choose_config(num_rows, num_experts)
    local_ids = topk_ids - first_expert
    sorted_rows, block_expert = align_by_expert(local_ids, num_experts, config.block_m)
    num_blocks = block_expert.numel()
    intermediate = torch.empty(num_rows, size, dtype=hidden.dtype, device=hidden.device)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    _gate_up_kernel[(num_blocks * triton.cdiv(size, config.block_n),)](
        hidden, w13, intermediate, sorted_rows, block_expert,
        num_rows, num_experts, hidden_size, size,
        hidden.stride(0), w13.stride(0), w13.stride(1), intermediate.stride(0),
        TOP_K=top_k, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        **options,
    )  # fmt: skip
    _down_kernel[(num_blocks * triton.cdiv(hidden_size, config.block_n),)](
        intermediate, w2, out_rows, topk_weights.contiguous(), sorted_rows, block_expert,
        num_rows, num_experts, hidden_size, size,
        intermediate.stride(0), w2.stride(0), w2.stride(1), out_rows.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, **options,
    )  # fmt: skip
    # Rows of experts another rank holds stay zero. [T * K, H] -> [T, H]
    return out_rows.view(num_tokens, top_k, hidden_size).sum(dim=1)
