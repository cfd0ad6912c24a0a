"""The fused rotary + KV-store kernel on CUDA at Llama-3.1-8B shapes (32 query / 8 KV
heads, head_dim 128, llama3 RoPE scaling, the engine's pool layout) against the rotary
layer (its own Triton kernel on CUDA) followed by an indexed store: bit for bit, in bf16
and float32, from one token to a long prefill; and replayed in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.kv_store import rotary_store_kv
from engine.layers.rotary import RotaryEmbedding
from tests.engine.test_fused_ops_gpu import LLAMA_3_1_ROPE, MAX_POSITION, split_qkv

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def make_inputs(num_tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """qkv [T, (Hq + 2 Hk) D], positions, slots (every fourth token a padding row, the
    rest scattered over the pool) and a pool [2, blocks, block_size, Hk, D]."""
    num_blocks = num_tokens // BLOCK_SIZE + 8
    qkv_size = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    qkv = torch.randn(num_tokens, qkv_size, device="cuda").to(dtype)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device="cuda")
    positions[0] = MAX_POSITION - 1
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:num_tokens]
    slots[3::4] = -1
    pool = torch.randn(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda")
    return qkv, positions, slots, pool.to(dtype)


def rotate_then_store(rope: RotaryEmbedding, qkv, positions, slots, pool) -> None:  # type: ignore[no-untyped-def]
    """The unfused path: the rotary layer in place, then an indexed store of real rows."""
    q, k, v = split_qkv(qkv)
    rotated_q, k = rope(positions, q, k)
    q.copy_(rotated_q)  # on CUDA the layer rotated q in place already
    real = slots >= 0
    flat = pool.view(2, -1, NUM_KV_HEADS, HEAD_DIM)
    flat[0, slots[real]] = k[real]
    flat[1, slots[real]] = v[real]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 37, 16384])
def test_rotary_store_kv(dtype: torch.dtype, num_tokens: int) -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(HEAD_DIM, MAX_POSITION, LLAMA_3_1_ROPE).cuda()
    qkv, positions, slots, pool = make_inputs(num_tokens, dtype)
    expected_qkv, expected_pool = qkv.clone(), pool.clone()
    rotate_then_store(rope, expected_qkv, positions, slots, expected_pool)
    q, k, v = split_qkv(qkv)
    k_before = k.clone()

    rotary_store_kv(positions, q, k, v, pool[0], pool[1], slots, rope.cos_cache, rope.sin_cache)

    assert torch.equal(q, split_qkv(expected_qkv)[0])
    assert torch.equal(pool, expected_pool)
    assert torch.equal(k, k_before)


def test_rotary_store_kv_replays_in_a_cuda_graph() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(HEAD_DIM, MAX_POSITION, LLAMA_3_1_ROPE).cuda()
    qkv, positions, slots, pool = make_inputs(8, torch.bfloat16)
    q, k, v = split_qkv(qkv)

    def step() -> None:
        rotary_store_kv(positions, q, k, v, pool[0], pool[1], slots, rope.cos_cache,
                        rope.sin_cache)  # fmt: skip

    step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_qkv, new_positions, new_slots, _ = make_inputs(8, torch.bfloat16)
    qkv.copy_(new_qkv)
    positions.copy_(new_positions)
    slots.copy_(new_slots)
    expected_qkv, expected_pool = qkv.clone(), pool.clone()
    rotate_then_store(rope, expected_qkv, positions, slots, expected_pool)
    graph.replay()
    assert torch.equal(q, split_qkv(expected_qkv)[0])
    assert torch.equal(pool, expected_pool)
