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
nothing; blocks past the end (expert id E) return at once; rows of experts another
rank holds are placed nowhere, and their output rows stay zero. The launch grid is
sized from an upper bound on the padded length, so nothing is read back to the host:
three launches (align, gate/up, down) and torch's sum over K.

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


def choose_config(
    num_rows: int, num_experts: int, dtype: torch.dtype = torch.bfloat16
) -> MoeTileConfig:
    """Tiles by the expected rows per expert: few (decode) wastes little on 16-row
    blocks; many fill 64-row blocks. float32 tiles are half as deep (shared memory)."""
    rows_per_expert = num_rows / max(1, num_experts)
    depth = 2 if dtype == torch.float32 else 1
    if rows_per_expert <= 16:
        return MoeTileConfig(block_m=16, block_n=64, block_k=128 // depth, num_stages=4)
    if rows_per_expert <= 64:
        return MoeTileConfig(block_m=32, block_n=64, block_k=64 // depth, num_stages=4)
    return MoeTileConfig(block_m=64, block_n=128, block_k=64 // depth, num_warps=8)


def align_by_expert(
    expert_ids: torch.Tensor, num_experts: int, block_m: int, first_expert: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, K] (global ids; this rank holds first_expert .. + num_experts - 1)
    -> (sorted_rows [P] int32, block_expert [P / block_m] int32), laid out as the module
    docstring draws; P bounds the padded length from above. One launch.

    Within an expert's run rows come in any order (they are placed by atomic counters):
    each row's result is computed alone, so the order changes no value."""
    num_rows = expert_ids.numel()
    # At most min(E, rows) experts are used, each padding fewer than block_m rows.
    max_len = num_rows + min(num_experts, num_rows) * (block_m - 1)
    max_len = triton.cdiv(max_len, block_m) * block_m
    device = expert_ids.device
    sorted_rows = torch.empty(max_len, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_len // block_m, dtype=torch.int32, device=device)
    experts_pad = triton.next_power_of_2(num_experts)
    cursor = torch.empty(experts_pad, dtype=torch.int32, device=device)
    _align_kernel[(1,)](
        expert_ids.contiguous(), sorted_rows, block_expert, cursor,
        num_rows, num_experts, first_expert, max_len,
        BLOCK_M=block_m, EXPERTS_PAD=experts_pad, CHUNK=1024,
        BLOCKS_CHUNK=max(1, 4096 // experts_pad), num_warps=8,
    )  # fmt: skip
    return sorted_rows, block_expert


@triton.jit
def _align_kernel(
    ids_ptr, sorted_rows_ptr, block_expert_ptr, cursor_ptr,
    num_rows, num_experts, first_expert, max_len,
    BLOCK_M: tl.constexpr, EXPERTS_PAD: tl.constexpr, CHUNK: tl.constexpr,
    BLOCKS_CHUNK: tl.constexpr,
):  # fmt: skip
    # One program: count rows per expert, lay out the padded runs, then place each row
    # at its expert's cursor. cursor: counts, then each run's next free position.
    experts = tl.arange(0, EXPERTS_PAD)
    expert_mask = experts < num_experts
    tl.store(cursor_ptr + experts, tl.zeros((EXPERTS_PAD,), dtype=tl.int32))
    tl.debug_barrier()
    offs = tl.arange(0, CHUNK)
    for start in range(0, num_rows, CHUNK):
        rows = start + offs
        expert = tl.load(ids_ptr + rows, mask=rows < num_rows, other=0).to(tl.int32)
        expert -= first_expert
        here = (rows < num_rows) & (expert >= 0) & (expert < num_experts)
        tl.atomic_add(cursor_ptr + expert, 1, mask=here)
    tl.debug_barrier()
    counts = tl.load(cursor_ptr + experts, mask=expert_mask, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # where each expert's padded run ends
    tl.debug_barrier()  # every thread has read the counts before they are overwritten
    tl.store(cursor_ptr + experts, ends - padded, mask=expert_mask)
    # A block's expert: how many runs end at or before its start (E: past the end).
    for first_block in range(0, max_len // BLOCK_M, BLOCKS_CHUNK):
        blocks = first_block + tl.arange(0, BLOCKS_CHUNK)
        ended = (ends[None, :] <= (blocks * BLOCK_M)[:, None]) & expert_mask[None, :]
        block_expert = tl.sum(ended.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, block_expert, mask=blocks < max_len // BLOCK_M)
    for start in range(0, max_len, CHUNK):
        tl.store(sorted_rows_ptr + start + offs, tl.full((CHUNK,), 0, tl.int32) + num_rows,
                 mask=start + offs < max_len)  # fmt: skip
    tl.debug_barrier()
    for start in range(0, num_rows, CHUNK):
        rows = start + offs
        expert = tl.load(ids_ptr + rows, mask=rows < num_rows, other=0).to(tl.int32)
        expert -= first_expert
        here = (rows < num_rows) & (expert >= 0) & (expert < num_experts)
        position = tl.atomic_add(cursor_ptr + expert, 1, mask=here)
        tl.store(sorted_rows_ptr + position, rows, mask=here)


@triton.jit
def _tile(sorted_rows_ptr, block_expert_ptr, num_rows, width, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):  # fmt: skip
    """This program's tile of a grouped GEMM: its block's expert (past the last one: an
    empty block), the block's sorted rows (num_rows: padding) with their mask, and its
    BLOCK_N output columns of ``width`` with their mask."""
    num_n = tl.cdiv(width, BLOCK_N)
    block = tl.program_id(0) // num_n
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    rows = tl.load(sorted_rows_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n = (tl.program_id(0) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, rows, rows < num_rows, n, n < width


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, out_ptr, sorted_rows_ptr, block_expert_ptr,
    num_rows, num_experts, hidden_size, intermediate_size,
    stride_x, stride_we, stride_wn, stride_out,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # out[r, n] = silu(x[r // K] . w[e, n]) * (x[r // K] . w[e, I + n]) for one block's rows.
    expert, rows, row_mask, n, n_mask = _tile(
        sorted_rows_ptr, block_expert_ptr, num_rows, intermediate_size, BLOCK_M, BLOCK_N
    )
    if expert >= num_experts:
        return
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
        w_gate = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        gate = tl.dot(x, w_gate, gate, input_precision=DOT_PRECISION)
        w_up = tl.load(up_ptrs, mask=w_mask, other=0.0)
        up = tl.dot(x, w_up, up, input_precision=DOT_PRECISION)
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
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # out[r, n] = weight[r] * (h[r] . w[e, n]) for one block's rows; n over hidden_size.
    expert, rows, row_mask, n, n_mask = _tile(
        sorted_rows_ptr, block_expert_ptr, num_rows, hidden_size, BLOCK_M, BLOCK_N
    )
    if expert >= num_experts:
        return
    k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_h + k[None, :]
    w_ptrs = w_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, intermediate_size, BLOCK_K):
        k_mask = k < intermediate_size - k0
        h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
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
    holds_all_experts: bool = False,
) -> torch.Tensor:
    """hidden [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; the
    router's topk_weights [T, K] and topk_ids [T, K] (global ids; this rank holds
    experts first_expert .. first_expert + E - 1) -> [T, H]: the sum over each token's
    experts held here of weight * down(silu(gate) * up). ``holds_all_experts``: no id
    falls outside, so every row is written and none needs zeroing first."""
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
    if num_rows == 0:
        return hidden.new_zeros(num_tokens, hidden_size)
    make_rows = torch.empty if holds_all_experts else torch.zeros
    out_rows = make_rows(num_rows, hidden_size, dtype=hidden.dtype, device=hidden.device)
    config = config or choose_config(num_rows, num_experts, hidden.dtype)
    sorted_rows, block_expert = align_by_expert(topk_ids, num_experts, config.block_m, first_expert)
    num_blocks = block_expert.numel()
    intermediate = torch.empty(num_rows, size, dtype=hidden.dtype, device=hidden.device)
    # NOTE: float32 uses exact fp32 products: TF32 would break parity with the float32
    # reference; 16-bit inputs ignore the setting.
    options = {
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "DOT_PRECISION": "ieee" if hidden.dtype == torch.float32 else None,
    }
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
