"""Write a step's new K/V into the paged cache in one launch.

Token t goes to flat slot ``slot_mapping[t]`` (block_id * block_size + offset) of
both planes; a negative slot marks a padding token (CUDA-graph batches are padded)
whose K/V are dropped, so padding never touches a block of a real request.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_token_stride,
    v_token_stride,
    k_block_stride,
    v_block_stride,
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    cols = tl.arange(0, BLOCK)
    mask = cols < ROW
    k = tl.load(k_ptr + token * k_token_stride + cols, mask=mask)
    v = tl.load(v_ptr + token * v_token_stride + cols, mask=mask)
    tl.store(k_cache_ptr + block * k_block_stride + offset * ROW + cols, k, mask=mask)
    tl.store(v_cache_ptr + block * v_block_stride + offset * ROW + cols, v, mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: [T, Hk, D] (rows may be strided, heads and dims contiguous);
    k_cache, v_cache: [num_blocks, block_size, Hk, D] with contiguous blocks."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    if k.stride(2) != 1 or k.stride(1) != head_dim or v.stride(2) != 1 or v.stride(1) != head_dim:
        raise ValueError("store_kv needs each token's heads and dims contiguous")
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), v.stride(0), k_cache.stride(0), v_cache.stride(0),
        ROW=row, BLOCK_SIZE=k_cache.shape[1], BLOCK=triton.next_power_of_2(row),
    )  # fmt: skip
