"""The fused rotary + KV-store kernel against the rotary layer's torch formula followed by
a plain indexed store, bit for bit, in Triton's interpreter on CPU (on CUDA where there is
a GPU); and the triton backend's ``rotate_and_store`` against the default composition that
the sdpa backend runs."""

from __future__ import annotations

import pytest
import torch

from engine.config import RopeConfig
from engine.forward_context import AttentionMetadata
from engine.layers.rotary import RotaryEmbedding

kv_store = pytest.importorskip("engine.kernels.kv_store")
pytestmark = pytest.mark.triton

LLAMA_3_ROPE = RopeConfig(
    theta=500000.0,
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)
MAX_POSITION = 300
BLOCK_SIZE = 4


def make_step(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: str, interleaved: bool = True) -> dict:  # fmt: skip
    """Five tokens (one a padding row, slot -1) as strided views of a fused qkv output,
    and a KV pool: the engine's [2, blocks, ...], or with K and V blocks interleaved
    ([blocks, 2, ...]: a layer's K then has strided blocks)."""
    torch.manual_seed(0)
    num_tokens, num_blocks = 5, 6
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device=device).to(dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    shape = [num_blocks, BLOCK_SIZE, num_kv_heads, head_dim]
    shape.insert(1 if interleaved else 0, 2)
    return {
        "positions": torch.tensor([0, 17, MAX_POSITION - 1, 3, 17], device=device),
        "q": q.view(num_tokens, num_q_heads, head_dim),
        "k": k.view(num_tokens, num_kv_heads, head_dim),
        "v": v.view(num_tokens, num_kv_heads, head_dim),
        "pool": torch.randn(shape, device=device).to(dtype),
        "plane_dim": 1 if interleaved else 0,
        "slots": torch.tensor([5, 22, -1, 0, 23], device=device),  # blocks 1, 5, -, 0, 5
    }


def caches(step: dict, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V planes of ``pool``: [num_blocks, block_size, Hk, D] views."""
    return pool.select(step["plane_dim"], 0), pool.select(step["plane_dim"], 1)


def expected_after(step: dict, rope: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, pool) as the rotary layer's torch formula and an indexed store leave them."""
    q, k = rope.forward_torch(step["positions"], step["q"], step["k"])
    pool = step["pool"].clone()
    slots = step["slots"][step["slots"] >= 0]
    real = step["slots"] >= 0
    for cache, new in zip(caches(step, pool), (k, step["v"]), strict=True):
        cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = new[real]  # writes through the view
    return q, pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim"),
    [(5, 1, 64), (4, 2, 96), (40, 8, 128)],  # 40 heads: two head tiles of 32
)
def test_rotary_store_kv_matches_rotary_then_store(
    device: str, dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    rope = RotaryEmbedding(head_dim, MAX_POSITION, LLAMA_3_ROPE).to(device)
    step = make_step(num_q_heads, num_kv_heads, head_dim, dtype, device)
    k_before, v_before = step["k"].clone(), step["v"].clone()
    expected_q, expected_pool = expected_after(step, rope)
    k_cache, v_cache = caches(step, step["pool"])

    kv_store.rotary_store_kv(step["positions"], step["q"], step["k"], step["v"], k_cache,
                             v_cache, step["slots"], rope.cos_cache, rope.sin_cache)  # fmt: skip

    assert torch.equal(step["q"], expected_q)  # in place
    assert torch.equal(step["pool"], expected_pool)  # the padding row wrote nothing
    assert torch.equal(step["k"], k_before) and torch.equal(step["v"], v_before)


def test_triton_backend_rotates_and_stores_as_the_default_composition(device: str) -> None:
    """The backend interface's invariant: the fused path returns the q and stores the k
    that the unfused default (rotary layer, then store_kv) gives."""
    from engine.attention.sdpa import SdpaBackend
    from engine.attention.triton_paged import TritonBackend

    rope = RotaryEmbedding(64, MAX_POSITION, LLAMA_3_ROPE).to(device)
    results = []
    for backend in (SdpaBackend(), TritonBackend(torch.device(device), num_kv_heads=2)):
        step = make_step(4, 2, 64, torch.float32, device, interleaved=False)
        step["slots"][2] = 9  # sdpa runs no CUDA graph, so stores no padding row
        meta = _metadata(step["slots"], backend)
        q = backend.rotate_and_store(rope, step["positions"], step["q"], step["k"], step["v"],
                                     *caches(step, step["pool"]), meta)  # fmt: skip
        results.append((q, step["pool"]))
    (sdpa_q, sdpa_pool), (triton_q, triton_pool) = results
    assert torch.equal(triton_q, sdpa_q) and torch.equal(triton_pool, sdpa_pool)


def test_rejects_what_it_cannot_write(device: str) -> None:
    rope = RotaryEmbedding(64, MAX_POSITION, LLAMA_3_ROPE).to(device)
    step = make_step(4, 2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="rotary_store_kv"):
        kv_store.rotary_store_kv(step["positions"], step["q"], step["k"], step["v"][:4],
                                 *caches(step, step["pool"]), step["slots"], rope.cos_cache,
                                 rope.sin_cache)  # fmt: skip


def _metadata(slot_mapping: torch.Tensor, backend) -> AttentionMetadata:  # type: ignore[no-untyped-def]
    """Only slot_mapping matters to the store; the rest is a one-sequence prefill."""
    num_tokens = slot_mapping.numel()
    device = slot_mapping.device
    return AttentionMetadata(
        num_tokens=num_tokens,
        num_seqs=1,
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        block_size=BLOCK_SIZE,
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_table=torch.zeros((1, 2), dtype=torch.int32, device=device),
        slot_mapping=slot_mapping,
        logits_index=torch.tensor([num_tokens - 1], device=device),
        backend=backend,
    )
