"""Fused elementwise kernels for the decoder layers on CUDA: one launch each.

They reproduce the torch formulas of the layers (``forward_torch`` in layernorm.py,
rotary.py, activation.py) with the same rounding points, so results are bit-for-bit
equal to torch on CUDA except for RMSNorm, whose mean of squares sums in another order
(outputs within a few ulps in float32; in bf16 that seldom crosses a rounding point):
- RMSNorm: float32 math, rounded to the input dtype, then times the weight (the
  product rounded once); the residual add rounds to the input dtype.
- rotary: float32 math, rounded once to the dtype of q and k.
- silu_and_mul: silu in float32 (expf and an IEEE division, as torch's CUDA kernel),
  rounded to the dtype, then times ``up`` (rounded once).
Every launch passes ``enable_fp_fusion=False``: torch runs ``a * b + c`` as two kernels,
and a fused multiply-add would round once where torch rounds twice.

Launches allocate only outputs of the inputs' shapes and never read back to the host,
so they can be captured in CUDA graphs. Offsets are int64: no row count overflows them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

MAX_NORM_SIZE = 32768  # one program holds a whole row in registers


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    num_heads,
    x_stride_t,
    x_stride_h,
    size,
    inv_size,
    eps,
    BLOCK: tl.constexpr,
):
    # One program per row; rows are [T, H] pairs so that per-head views [T, H, D] of a
    # fused projection are read in place. The output is contiguous.
    row = tl.program_id(0).to(tl.int64)
    t = row // num_heads
    h = row % num_heads
    cols = tl.arange(0, BLOCK)
    mask = cols < size
    x = tl.load(x_ptr + t * x_stride_t + h * x_stride_h + cols, mask=mask, other=0.0)
    out = _rms_norm_row(x.to(tl.float32), weight_ptr, cols, mask, inv_size, eps, x.dtype)
    tl.store(out_ptr + row * size + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    x_stride,
    residual_stride,
    size,
    inv_size,
    eps,
    BLOCK: tl.constexpr,
):
    # In place: residual <- x + residual, x <- norm(x + residual).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < size
    x_ptrs = x_ptr + row * x_stride + cols
    residual_ptrs = residual_ptr + row * residual_stride + cols
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    residual = tl.load(residual_ptrs, mask=mask, other=0.0)
    total = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
    tl.store(residual_ptrs, total, mask=mask)
    out = _rms_norm_row(total.to(tl.float32), weight_ptr, cols, mask, inv_size, eps, x.dtype)
    tl.store(x_ptrs, out.to(x.dtype), mask=mask)


@triton.jit
def _rms_norm_row(x, weight_ptr, cols, mask, inv_size, eps, dtype: tl.constexpr):
    """weight * (x * rsqrt(mean(x^2) + eps)).to(dtype), the product in float32; x is
    float32 and 0 where masked."""
    # NOTE: sum * (1 / size), as torch's CUDA mean; the summation order is ours.
    mean_square = tl.sum(x * x, axis=0) * inv_size
    normed = (x * tl.rsqrt(mean_square + eps)).to(dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    return weight.to(tl.float32) * normed.to(tl.float32)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    cache_stride,
    num_q_heads,
    num_k_heads,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    # One program per token; its cos/sin row serves all of its q and k heads.
    t = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + t).to(tl.int64)
    cos_row = cos_ptr + position * cache_stride
    sin_row = sin_ptr + position * cache_stride
    q_row = q_ptr + t * q_stride_t
    k_row = k_ptr + t * k_stride_t
    rotate_heads(q_row, q_stride_h, q_row, q_stride_h, num_q_heads, cos_row, sin_row, HALF,
                 BLOCK_HALF, BLOCK_HQ)  # fmt: skip
    rotate_heads(k_row, k_stride_h, k_row, k_stride_h, num_k_heads, cos_row, sin_row, HALF,
                 BLOCK_HALF, BLOCK_HK)  # fmt: skip


@triton.jit
def rotate_heads(
    x_row,
    stride_h,
    out_row,
    out_stride_h,
    num_heads,
    cos_row,
    sin_row,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """x * cos + rotate_half(x) * sin for one token's heads, into ``out_row`` (which may be
    ``x_row``: in place): [x1 | x2] -> [x1 * cos1 - x2 * sin1 | x2 * cos2 + x1 * sin2].
    Also used by kv_store.py's fused rotary + KV store."""
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    cos1 = tl.load(cos_row + d, mask=d_mask, other=0.0)[None, :]
    cos2 = tl.load(cos_row + HALF + d, mask=d_mask, other=0.0)[None, :]
    sin1 = tl.load(sin_row + d, mask=d_mask, other=0.0)[None, :]
    sin2 = tl.load(sin_row + HALF + d, mask=d_mask, other=0.0)[None, :]
    for first_head in range(0, num_heads, BLOCK_H):
        heads = first_head + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None] & d_mask[None, :]
        ptrs = x_row + heads[:, None] * stride_h + d[None, :]  # [BLOCK_H, BLOCK_HALF]
        x1 = tl.load(ptrs, mask=mask, other=0.0)
        x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        out_ptrs = out_row + heads[:, None] * out_stride_h + d[None, :]
        dtype = out_row.dtype.element_ty
        # NOTE: x1 * cos1 - x2 * sin1 is torch's x1 * cos1 + (-x2) * sin1 exactly.
        tl.store(out_ptrs, (x1 * cos1 - x2 * sin1).to(dtype), mask=mask)
        tl.store(out_ptrs + HALF, (x2 * cos2 + x1 * sin2).to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    x_stride,
    size,
    BLOCK: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
):
    # Grid (rows, blocks of the output row); x rows are [gate | up], each `size` long.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + size + cols, mask=mask, other=0.0)
    dtype = gate.dtype
    gate = gate.to(tl.float32)
    # libdevice's exp is expf, as torch's; tl.exp is a faster approximation.
    exp_neg = libdevice.exp(-gate) if USE_LIBDEVICE else tl.exp(-gate)
    silu = tl.div_rn(gate, 1.0 + exp_neg).to(dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * size + cols, out.to(dtype), mask=mask)


# NOTE: Triton's interpreter (CPU tests) has no libdevice; there the kernel uses tl.exp.
_USE_LIBDEVICE = isinstance(_silu_and_mul_kernel, triton.runtime.JITFunction)
_SILU_BLOCK = 1024
ROTARY_TILE = 2048  # elements of one [heads, D / 2] tile


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., N] over its last dim into a new contiguous tensor; a 3-D x
    (a per-head view [T, H, D] split from a fused projection) is read in place."""
    size = _check_norm_size(x, weight)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x if x.dim() == 3 else x.reshape(-1, 1, size)  # [T, H, N]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if out.numel() == 0:
        return out
    block = triton.next_power_of_2(size)
    _rms_norm_kernel[(rows.size(0) * rows.size(1),)](
        rows,
        out,
        weight,
        rows.size(1),
        rows.stride(0),
        rows.stride(1),
        size,
        1.0 / size,
        eps,
        BLOCK=block,
        num_warps=_norm_num_warps(block),
        enable_fp_fusion=False,
    )
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) for x, residual [..., N], IN PLACE: the sum is
    written into residual's storage and the normed output into x's, and both are
    returned. Callers must not read the old x or residual afterwards."""
    size = _check_norm_size(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype or weight.dtype != x.dtype:
        raise ValueError(
            f"fused_add_rms_norm needs x, residual and weight of one dtype and x, residual "
            f"of one shape; got x {x.dtype} {tuple(x.shape)}, residual {residual.dtype} "
            f"{tuple(residual.shape)}, weight {weight.dtype}"
        )
    x_rows, residual_rows = _rows_in_place(x), _rows_in_place(residual)  # [T, N] views
    if x_rows.size(0) == 0:
        return x, residual
    block = triton.next_power_of_2(size)
    _fused_add_rms_norm_kernel[(x_rows.size(0),)](
        x_rows,
        residual_rows,
        weight,
        x_rows.stride(0),
        residual_rows.stride(0),
        size,
        1.0 / size,
        eps,
        BLOCK=block,
        num_warps=_norm_num_warps(block),
        enable_fp_fusion=False,
    )
    return x, residual


def rotary_embedding_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> None:
    """Rotates q [T, Hq, D] and k [T, Hk, D] IN PLACE by the angles of ``positions`` [T]
    (rotate-half layout). q and k may be strided views (split from a fused qkv output);
    their last dim must be contiguous. cos/sin caches: float32 [max_position, D], one
    row stride. Positions are not range-checked (that would read back to the host)."""
    num_tokens, num_q_heads, head_dim = q.shape
    if (
        k.shape[0] != num_tokens
        or k.shape[2] != head_dim
        or positions.shape != (num_tokens,)
        or head_dim % 2
        or q.stride(-1) != 1
        or k.stride(-1) != 1
        or cos_cache.stride() != sin_cache.stride()
        or cos_cache.stride(-1) != 1
    ):
        raise ValueError(
            f"rotary_embedding_ needs q [T, Hq, D], k [T, Hk, D] with contiguous last dims, "
            f"positions [T], an even D and cos/sin caches of one layout; got q "
            f"{tuple(q.shape)} {q.stride()}, k {tuple(k.shape)} {k.stride()}, positions "
            f"{tuple(positions.shape)}, caches {cos_cache.stride()} {sin_cache.stride()}"
        )
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    max_heads = max(1, ROTARY_TILE // block_half)
    _rotary_kernel[(num_tokens,)](
        positions,
        q,
        k,
        cos_cache,
        sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_cache.stride(0),
        num_q_heads,
        k.size(1),
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_HQ=min(triton.next_power_of_2(num_q_heads), max_heads),
        BLOCK_HK=min(triton.next_power_of_2(k.size(1)), max_heads),
        enable_fp_fusion=False,
    )


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x [..., 2F] laid out [gate | up]: a new tensor [..., F]."""
    size = x.size(-1) // 2
    if x.size(-1) % 2:
        raise ValueError(f"silu_and_mul needs an even last dim; got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.reshape(-1, 2 * size)  # [M, 2F]; a view for 2-D or contiguous x
    out = torch.empty((*x.shape[:-1], size), dtype=x.dtype, device=x.device)
    if rows.size(0) == 0 or size == 0:
        return out
    grid = (rows.size(0), triton.cdiv(size, _SILU_BLOCK))
    _silu_and_mul_kernel[grid](
        rows,
        out,
        rows.stride(0),
        size,
        BLOCK=_SILU_BLOCK,
        USE_LIBDEVICE=_USE_LIBDEVICE,
        enable_fp_fusion=False,
    )
    return out


def _check_norm_size(x: torch.Tensor, weight: torch.Tensor) -> int:
    size = x.size(-1)
    if weight.shape != (size,) or not 0 < size <= MAX_NORM_SIZE:
        raise ValueError(
            f"RMSNorm kernels need x [..., N] and weight [N], 0 < N <= {MAX_NORM_SIZE}; "
            f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    return size


def _rows_in_place(x: torch.Tensor) -> torch.Tensor:
    """x as a [T, N] view with a contiguous last dim (an in-place kernel cannot copy)."""
    if x.stride(-1) != 1 or not (x.dim() == 2 or x.is_contiguous()):
        raise ValueError(
            f"in-place RMSNorm needs rows with a contiguous last dim; got {tuple(x.shape)} "
            f"with strides {x.stride()}"
        )
    return x.view(-1, x.size(-1))


def _norm_num_warps(block: int) -> int:
    return min(16, max(4, block // 512))
