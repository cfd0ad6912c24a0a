"""The paged Triton attention kernels against a torch reference, in Triton's interpreter
on CPU (small tiles, so small contexts still cross tiles, blocks and splits).

bfloat16 is left to test_paged_attention_gpu.py: the interpreter's tl.dot gives garbage
for bfloat16 (Triton 3.9); float16 stands in for the 16-bit path here."""

from __future__ import annotations

import pytest
import torch

from tests.engine.paged_attention_cases import make_batch, reference_attention

pytestmark = pytest.mark.triton

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def kernels():
    from engine.kernels import paged_attention

    return paged_attention


def assert_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert not out.isnan().any()
    tol = TOLERANCE[out.dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "num_splits", "dtype"),
    [
        (4, 4, 1, torch.float32),
        (4, 2, 3, torch.float32),
        (8, 2, 1, torch.float32),
        (8, 2, 4, torch.float32),
        (6, 2, 2, torch.float32),  # 3 query heads per KV head: padded to 16 rows
        (8, 2, 3, torch.float16),
    ],
)
def test_decode_matches_reference(kernels, num_heads, num_kv_heads, num_splits, dtype) -> None:
    # seq_len 0 rows are CUDA-graph padding; 100 tokens with 4 splits leaves a split empty
    seq_lens = [0, 1, 37, 100, 16, 0]
    batch = make_batch([1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, 32, dtype)
    out = torch.full_like(batch.q, float("nan"))
    kernels.paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, out, batch.seq_lens,
                                   batch.block_table, batch.scale, num_splits)  # fmt: skip
    assert_close(out, reference_attention(batch))
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize(("head_dim", "block_size"), [(128, 16), (64, 32), (16, 8)])
def test_decode_head_dims_and_block_sizes(kernels, head_dim, block_size) -> None:
    seq_lens = [70, 3]
    batch = make_batch([1, 1], seq_lens, 4, 2, head_dim, torch.float32, block_size)
    out = torch.empty_like(batch.q)
    kernels.paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, out, batch.seq_lens,
                                   batch.block_table, batch.scale, 2)  # fmt: skip
    assert_close(out, reference_attention(batch))


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "dtype"),
    [
        (4, 4, torch.float32),
        (4, 2, torch.float32),
        (8, 2, torch.float32),
        (6, 2, torch.float32),  # 16 rows hold 5 tokens x 3 heads and one padding row
        (8, 2, torch.float16),
    ],
)
def test_prefill_matches_reference(kernels, num_heads, num_kv_heads, dtype) -> None:
    # whole prompts, a prefix-cache hit (30 cached + 1 new), a decode token in the batch,
    # a later chunk of a chunked prefill (20 cached + 17 new), a sequence with no new token
    q_lens = [5, 1, 40, 17, 1, 0]
    seq_lens = [5, 31, 40, 37, 9, 12]
    batch = make_batch(q_lens, seq_lens, num_heads, num_kv_heads, 32, dtype)
    out = torch.full_like(batch.q, float("nan"))
    kernels.paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, out,
                                    batch.query_start_loc, batch.seq_lens, batch.block_table,
                                    batch.scale, batch.max_query_len)  # fmt: skip
    assert_close(out, reference_attention(batch))


@pytest.mark.parametrize(("head_dim", "block_size"), [(128, 16), (64, 32), (16, 8)])
def test_prefill_head_dims_and_block_sizes(kernels, head_dim, block_size) -> None:
    q_lens, seq_lens = [19, 2], [19, 50]
    batch = make_batch(q_lens, seq_lens, 4, 2, head_dim, torch.float32, block_size)
    out = torch.empty_like(batch.q)
    kernels.paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, out,
                                    batch.query_start_loc, batch.seq_lens, batch.block_table,
                                    batch.scale, batch.max_query_len)  # fmt: skip
    assert_close(out, reference_attention(batch))


def test_decode_equals_prefill_of_one_token(kernels) -> None:
    """The two kernels agree where their work overlaps: one new token per sequence."""
    seq_lens = [33, 1, 64]
    batch = make_batch([1, 1, 1], seq_lens, 8, 2, 32, torch.float32)
    decode_out, prefill_out = torch.empty_like(batch.q), torch.empty_like(batch.q)
    kernels.paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, decode_out,
                                   batch.seq_lens, batch.block_table, batch.scale, 2)  # fmt: skip
    kernels.paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, prefill_out,
                                    batch.query_start_loc, batch.seq_lens, batch.block_table,
                                    batch.scale, 1)  # fmt: skip
    torch.testing.assert_close(decode_out, prefill_out, atol=1e-6, rtol=1e-6)


def test_decode_num_splits_fills_the_gpu_without_tiny_splits(kernels) -> None:
    assert kernels.decode_num_splits(1, 4096, 132, num_kv_heads=8) == 16
    assert kernels.decode_num_splits(1, 128, 132, num_kv_heads=8) == 1
    assert kernels.decode_num_splits(256, 4096, 132, num_kv_heads=8) == 1
    assert kernels.decode_num_splits(1, 1 << 20, 132, num_kv_heads=1) == kernels.MAX_SPLITS


def test_rejects_layouts_the_kernels_do_not_handle(kernels) -> None:
    batch = make_batch([1], [4], 6, 4, 32, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        kernels.paged_decode_attention(batch.q, batch.k_cache, batch.v_cache,
                                       torch.empty_like(batch.q), batch.seq_lens,
                                       batch.block_table, batch.scale, 1)  # fmt: skip
