"""Rotate a step's new q and k and write its K/V into the paged cache, in one launch.

Token t's position rotates its q heads in place and its k heads on their way to flat slot
``slot_mapping[t]`` (block_id * block_size + offset) of the K plane; its v heads go to the
same slot of the V plane. A negative slot marks a padding token (CUDA-graph batches are
padded) whose K/V are dropped, so padding never touches a block of a real request; its q
is rotated all the same (no one reads it).

The rotation is fused_ops.rotate_heads, the math of ``RotaryEmbedding.forward_torch``:
q and the stored k are bit for bit what the rotary layer followed by a plain store gives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.fused_ops import ROTARY_TILE, rotate_heads


@triton.jit
def _rotary_store_kv_kernel(
    positions_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
    k_cache_stride_block, k_cache_stride_token, k_cache_stride_head,
    v_cache_stride_block, v_cache_stride_token, v_cache_stride_head,
    rope_stride, num_q_heads, num_kv_heads,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per token; its cos/sin row serves all of its q and k heads.
    t = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + t).to(tl.int64)
    cos_row = cos_ptr + position * rope_stride
    sin_row = sin_ptr + position * rope_stride
    q_row = q_ptr + t * q_stride_t
    rotate_heads(q_row, q_stride_h, q_row, q_stride_h, num_q_heads, cos_row, sin_row, HALF,
                 BLOCK_HALF, BLOCK_HQ)  # fmt: skip
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    # NOTE: int64, as block * stride overflows int32 in a large pool.
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    k_out = k_cache_ptr + block * k_cache_stride_block + offset * k_cache_stride_token
    rotate_heads(k_ptr + t * k_stride_t, k_stride_h, k_out, k_cache_stride_head, num_kv_heads,
                 cos_row, sin_row, HALF, BLOCK_HALF, BLOCK_HK)  # fmt: skip
    v_out = v_cache_ptr + block * v_cache_stride_block + offset * v_cache_stride_token
    heads = tl.arange(0, BLOCK_HK)
    d = tl.arange(0, BLOCK_D)
    for first_head in range(0, num_kv_heads, BLOCK_HK):
        head = first_head + heads
        mask = (head < num_kv_heads)[:, None] & (d < HEAD_DIM)[None, :]
        v = tl.load(v_ptr + t * v_stride_t + head[:, None] * v_stride_h + d[None, :], mask=mask)
        tl.store(v_out + head[:, None] * v_cache_stride_head + d[None, :], v, mask=mask)


def rotary_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> None:
    """Rotates q [T, Hq, D] IN PLACE by the angles of ``positions`` [T], and writes k
    (rotated) and v [T, Hk, D] into k_cache, v_cache [num_blocks, block_size, Hk, D] at
    ``slot_mapping`` [T] (negative: dropped). k itself is left as it was. q, k, v may be
    strided views (split from a fused qkv output) with contiguous last dims; the caches'
    blocks may be strided (a layer's view of the pool). cos/sin caches: float32
    [max_position, D] of one layout (RotaryEmbedding's). Positions and slots are not
    range-checked (that would read back to the host)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if (
        k.shape != (num_tokens, num_kv_heads, head_dim)
        or v.shape != k.shape
        or k_cache.shape[1:] != v_cache.shape[1:]
        or k_cache.shape[2:] != (num_kv_heads, head_dim)
        or positions.shape != (num_tokens,)
        or slot_mapping.shape != (num_tokens,)
        or head_dim % 2
        or any(x.stride(-1) != 1 for x in (q, k, v, k_cache, v_cache, cos_cache))
        or cos_cache.stride() != sin_cache.stride()
    ):
        raise ValueError(
            f"rotary_store_kv needs q [T, Hq, D], k and v [T, Hk, D], caches [N, block, Hk, "
            f"D], positions and slots [T], an even D, contiguous last dims and cos/sin caches "
            f"of one layout; got q {tuple(q.shape)} {q.stride()}, k {tuple(k.shape)} "
            f"{k.stride()}, v {tuple(v.shape)} {v.stride()}, caches {tuple(k_cache.shape)} "
            f"{tuple(v_cache.shape)}, positions {tuple(positions.shape)}, slots "
            f"{tuple(slot_mapping.shape)}, cos/sin strides {cos_cache.stride()} "
            f"{sin_cache.stride()}"
        )
    if num_tokens == 0:
        return
    block_half = triton.next_power_of_2(head_dim // 2)
    max_heads = max(1, ROTARY_TILE // block_half)
    _rotary_store_kv_kernel[(num_tokens,)](
        positions, slot_mapping, q, k, v, k_cache, v_cache, cos_cache, sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        cos_cache.stride(0), num_q_heads, num_kv_heads,
        HEAD_DIM=head_dim, HALF=head_dim // 2, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_HALF=block_half, BLOCK_HQ=min(triton.next_power_of_2(num_q_heads), max_heads),
        BLOCK_HK=min(triton.next_power_of_2(num_kv_heads), max_heads), BLOCK_D=2 * block_half,
        enable_fp_fusion=False,
    )  # fmt: skip
