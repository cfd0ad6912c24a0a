"""Shared by the paged-attention tests (CPU interpreter and GPU): a paged KV cache with
scattered blocks, and a plain torch reference that gathers each context through the
block table."""

from __future__ import annotations

from dataclasses import dataclass

import torch

POISON_BLOCK = 0  # NaN everywhere: stale block-table entries point here


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hk, D], block stride 2x its size
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32
    scale: float

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())


def make_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    device: str = "cpu",
    seed: int = 0,
) -> PagedBatch:
    """Sequence b has seq_lens[b] tokens in the cache, of which the last q_lens[b] are
    this step's queries. Blocks are handed out in a random order; slots past each context
    and block-table entries past its last block hold NaN (reading them shows up)."""
    gen = torch.Generator().manual_seed(seed)
    device_gen = torch.Generator(device).manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq)
    max_blocks = max(max(blocks_per_seq), 1) + 2
    # K and V interleaved per block, as views of one pool: the block stride is twice
    # a block's size, as with a layer's K in the engine's pool.
    shape = (num_blocks, 2, block_size, num_kv_heads, head_dim)
    pool = torch.randn(shape, generator=device_gen, device=device).to(dtype)
    pool[POISON_BLOCK] = float("nan")
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_table = torch.full((len(seq_lens), max_blocks), POISON_BLOCK, dtype=torch.int32)
    for b, (seq_len, num_seq_blocks) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        blocks = [order.pop() for _ in range(num_seq_blocks)]
        block_table[b, :num_seq_blocks] = torch.tensor(blocks, dtype=torch.int32)
        if seq_len % block_size:
            pool[blocks[-1], :, seq_len % block_size :] = float("nan")
    q_shape = (sum(q_lens), num_heads, head_dim)
    q = torch.randn(q_shape, generator=device_gen, device=device).to(dtype)
    starts = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    return PagedBatch(
        q=q,
        k_cache=pool[:, 0],
        v_cache=pool[:, 1],
        query_start_loc=starts.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=block_table.to(device),
        scale=head_dim**-0.5,
    )


def reference_attention(batch: PagedBatch) -> torch.Tensor:
    """Causal attention of each sequence's queries over its gathered context, in float64.
    [T, Hq, D]; sequences with no context give zeros."""
    k_cache, v_cache = batch.k_cache, batch.v_cache
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = batch.q.shape[1] // num_kv_heads
    out = torch.zeros(batch.q.shape, dtype=torch.float64, device=batch.q.device)
    starts = batch.query_start_loc.tolist()
    for b, seq_len in enumerate(batch.seq_lens.tolist()):
        q_len = starts[b + 1] - starts[b]
        if q_len == 0 or seq_len == 0:
            continue
        pos = torch.arange(seq_len, device=batch.q.device)
        blocks = batch.block_table[b, pos // block_size].long()
        # [S, Hk, D] -> [Hq, S, D]: query head h reads KV head h // group
        keys = k_cache[blocks, pos % block_size].double().repeat_interleave(group, 1)
        values = v_cache[blocks, pos % block_size].double().repeat_interleave(group, 1)
        queries = batch.q[starts[b] : starts[b + 1]].double()  # [Q, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * batch.scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=batch.q.device)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[starts[b] : starts[b + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out
