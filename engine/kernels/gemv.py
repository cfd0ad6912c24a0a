"""One-row matrix-vector products (``y = x W^T + b`` for x of one row) in Triton.

Batch-1 decode reads every weight once per token, so its GEMMs are memory-bound
GEMVs; cuBLAS reaches 2.8-3.3 TB/s of an H200's ~4.2 on the 4096-wide projections of
an 8B model (``benchmarks/gemv_bench.py``). Here each program owns ``block_n`` rows of
W and walks K in ``block_k`` steps, keeping [block_n, block_k] float32 partial sums in
registers and reducing them once at the end: every load is a contiguous run of K, and
there are enough programs in flight to keep HBM busy.

Results are float32 sums rounded once to the output dtype (cuBLAS also accumulates
in float32, in another order). Only bf16/fp16 weights take this path; float32 keeps
cuBLAS (the CPU/GPU parity references run in float32). No host sync, allocation of
the output only: safe inside CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

GEMV_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # rows of W per program
    block_k: int  # columns per step
    num_warps: int
    num_stages: int


# Chosen on an H200 with benchmarks/gemv_bench.py --sweep over Llama-3.1-8B's
# projections: narrow weights (o, down: 4096 rows) want more columns per step and more
# warps per program; wide ones (qkv, gate_up, the LM head) more programs.
NARROW_CONFIG = GemvConfig(block_n=16, block_k=1024, num_warps=8, num_stages=3)
WIDE_CONFIG = GemvConfig(block_n=8, block_k=512, num_warps=4, num_stages=3)
NARROW_ROWS = 4096


def config_for(num_out: int) -> GemvConfig:
    """The tiles for a weight of ``num_out`` rows."""
    return NARROW_CONFIG if num_out <= NARROW_ROWS else WIDE_CONFIG


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        if EVEN_K:
            x = tl.load(x_ptr + k)
            w = tl.load(w_rows + k[None, :], mask=row_ok[:, None], other=0.0)
        else:
            k_ok = k < K
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
            w = tl.load(w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of shape [1, K] (or [K]) and ``weight``
    [N, K] with contiguous rows; returns [1, N] (or [N])."""
    num_out, size_in = weight.shape
    if x.shape[-1] != size_in or x.numel() != size_in:
        raise ValueError(f"gemv takes one row of {size_in} features, got {tuple(x.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("gemv needs the weight's rows contiguous")
    config = config or config_for(num_out)
    x = x.contiguous()
    out = x.new_empty((*x.shape[:-1], num_out))
    grid = (triton.cdiv(num_out, config.block_n),)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else weight, out, num_out, size_in, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=size_in % config.block_k == 0,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
