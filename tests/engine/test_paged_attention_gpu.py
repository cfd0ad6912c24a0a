"""The paged Triton attention kernels on CUDA at Llama-3.1-8B head shapes (32 query heads,
8 KV heads, head_dim 128) with contexts up to 4k, against the gathered float64 reference;
both kernels captured in a CUDA graph (which also proves they never sync with the host);
and a pool big enough that block offsets overflow int32."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from tests.engine.paged_attention_cases import PagedBatch, make_batch, reference_attention

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

HEADS = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
DECODE_SEQ_LENS = [4096, 0, 1, 17, 4095, 2000, 0, 333, 1024, 3000, 64, 0]
# a whole prompt, decode tokens, prefix hits / later chunks, a short prompt, no new token
PREFILL_Q_LENS = [2048, 1, 512, 1, 100, 3, 0]
PREFILL_SEQ_LENS = [2048, 4000, 3512, 1, 100, 4096, 7]


def assert_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert not out.isnan().any()
    tol = TOLERANCE[out.dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def decode(batch: PagedBatch, out: torch.Tensor, num_splits: int) -> None:
    paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, out, batch.seq_lens,
                           batch.block_table, batch.scale, num_splits)  # fmt: skip


def prefill(batch: PagedBatch, out: torch.Tensor, max_query_len: int) -> None:
    paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, out, batch.query_start_loc,
                            batch.seq_lens, batch.block_table, batch.scale,
                            max_query_len)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_matches_reference(dtype: torch.dtype, num_splits: int) -> None:
    seq_lens = DECODE_SEQ_LENS
    batch = make_batch([1] * len(seq_lens), seq_lens, dtype=dtype, device="cuda", **HEADS)
    out = torch.full_like(batch.q, float("nan"))
    decode(batch, out, num_splits)
    assert_close(out, reference_attention(batch))
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_matches_reference(dtype: torch.dtype) -> None:
    batch = make_batch(PREFILL_Q_LENS, PREFILL_SEQ_LENS, dtype=dtype, device="cuda", **HEADS)
    out = torch.full_like(batch.q, float("nan"))
    prefill(batch, out, batch.max_query_len)
    assert_close(out, reference_attention(batch))


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_replays_in_a_cuda_graph(num_splits: int) -> None:
    """Captured on one batch, replayed after another batch of the same shapes (the same
    lengths in another order) was copied into its buffers."""
    seq_lens = [4000, 0, 1, 2500, 17, 0, 900, 3333]
    captured = make_batch([1] * 8, seq_lens, dtype=torch.bfloat16, device="cuda", **HEADS)
    out = torch.empty_like(captured.q)
    decode(captured, out, num_splits)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode(captured, out, num_splits)
    replayed = make_batch([1] * 8, seq_lens[::-1], dtype=torch.bfloat16, device="cuda", seed=1,
                          **HEADS)  # fmt: skip
    _copy_into(captured, replayed)
    out.fill_(float("nan"))
    graph.replay()
    assert_close(out, reference_attention(replayed))


def test_prefill_replays_in_a_cuda_graph() -> None:
    captured = make_batch([300, 5], [900, 2000], dtype=torch.bfloat16, device="cuda", **HEADS)
    out = torch.empty_like(captured.q)
    prefill(captured, out, 300)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        prefill(captured, out, 300)
    replayed = make_batch([5, 300], [2000, 900], dtype=torch.bfloat16, device="cuda", seed=1,
                          **HEADS)  # fmt: skip
    _copy_into(captured, replayed)
    out.fill_(float("nan"))
    graph.replay()
    assert_close(out, reference_attention(replayed))


def test_block_offsets_past_int32() -> None:
    """A layer's K view whose block stride x block id exceeds 2**31 elements."""
    small = make_batch([3, 1], [40, 4096], dtype=torch.bfloat16, device="cuda", **HEADS)
    num_small_blocks, block_size, num_kv_heads, head_dim = small.k_cache.shape
    block_elements = 2 * block_size * num_kv_heads * head_dim  # K and V per block
    num_blocks = (1 << 31) // block_elements + num_small_blocks + 1
    pool = torch.empty((num_blocks, 2, block_size, num_kv_heads, head_dim),
                       dtype=torch.bfloat16, device="cuda")  # fmt: skip
    high = num_blocks - num_small_blocks  # every block used lies past 2**31 elements
    pool[high:, 0] = small.k_cache
    pool[high:, 1] = small.v_cache
    big = replace(small, k_cache=pool[:, 0], v_cache=pool[:, 1],
                  block_table=small.block_table + high)  # fmt: skip
    out = torch.empty_like(big.q)
    prefill(big, out, 3)
    assert_close(out, reference_attention(small))

    # one decode query per sequence over the same contexts
    q = torch.randn((2, *small.q.shape[1:]), dtype=torch.bfloat16, device="cuda")
    query_start_loc = torch.tensor([0, 1, 2], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    decode(replace(big, q=q, query_start_loc=query_start_loc), out, 4)
    assert_close(out, reference_attention(replace(small, q=q, query_start_loc=query_start_loc)))


def _copy_into(captured: PagedBatch, new: PagedBatch) -> None:
    """Copy a batch of the same shapes into the buffers a graph was captured on."""
    for name in ("q", "k_cache", "v_cache", "query_start_loc", "seq_lens", "block_table"):
        getattr(captured, name).copy_(getattr(new, name))
