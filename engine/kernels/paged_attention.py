"""Paged attention in Triton: decode (split-K) and prefill (causal, any start), both
reading every key (cached prefix and this step's tokens) in place from the paged KV cache.

Cache layout of one layer (K and V alike; the block stride may exceed one block's size,
as the layer's K is a view of the whole pool)::

    k_cache[num_blocks, block_size, num_kv_heads, head_dim]

    position p of sequence b  ->  k_cache[block_table[b, p // block_size], p % block_size]

    block_table[b] = [7, 2, 9]         block_size = 4
    positions        0..3  4..7  8..10
    blocks             7     2     9   (block 9 holds 3 tokens, one slot free)

GQA: the G = Hq // Hk query heads of one KV head are handled by one program, folded into
the rows of its query tile (row r = query token r // G, head r % G), so each K/V tile is
loaded once for all of them. Scores are kept in base 2 (``qk_scale = scale * log2(e)``,
``exp2``); log-sum-exps of split-K partials too.

Both entry points write into ``out``, allocate nothing whose shape depends on data, never
read back to the host, and can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows
MIN_SPLIT_LEN = 256  # tokens: below this a split's partial costs more than it saves
MAX_SPLITS = 32


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # context tokens per tile (may span several cache blocks)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # query rows per program: (tokens x query heads of one KV head)
    block_n: int  # context tokens per tile
    num_warps: int
    num_stages: int


def decode_config(dtype: torch.dtype, head_dim: int, device: torch.device) -> DecodeConfig:
    """Tiles chosen for H200-class GPUs (benchmarks/attention_bench.py --sweep compares
    others)."""
    if device.type != "cuda":  # Triton's interpreter: small tiles so tests cross tiles
        return DecodeConfig(block_n=32, num_warps=1, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=2)
    return DecodeConfig(block_n=64, num_warps=4, num_stages=3)


def prefill_config(dtype: torch.dtype, head_dim: int, device: torch.device) -> PrefillConfig:
    """Tiles for H200-class GPUs: the [block_m, head_dim] float32 accumulator lives in
    registers, so wider heads or float32 take fewer rows."""
    if device.type != "cuda":
        return PrefillConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


def decode_num_splits(
    batch_size: int, max_seq_len: int, num_sms: int, num_kv_heads: int = 8
) -> int:
    """Splits of each context for decode: enough programs to fill about two waves of the
    GPU's SMs, but no split shorter than MIN_SPLIT_LEN tokens of ``max_seq_len``."""
    num_programs = max(1, batch_size * num_kv_heads)
    wanted = triton.cdiv(2 * num_sms, num_programs)
    longest = max(1, max_seq_len // MIN_SPLIT_LEN)
    return max(1, min(wanted, longest, MAX_SPLITS))


@triton.jit
def _load_kv_tile(cache, table_row, pos, in_range, kv_head_offset, stride_block, stride_token,
                  offs_d, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """[BLOCK_N, D] tile of one KV head at context positions ``pos``. With MASKED,
    ``in_range`` masks positions past the context: their block-table entries (perhaps
    stale) are never read, their keys load as zeros."""
    if MASKED:
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=in_range, other=0)
    else:
        block = tl.load(table_row + pos // BLOCK_SIZE)
    # NOTE: int64, as block * stride_block overflows int32 in a large pool.
    token = block.to(tl.int64) * stride_block + (pos % BLOCK_SIZE) * stride_token
    ptrs = cache + kv_head_offset + token[:, None] + offs_d[None, :]
    if MASKED:
        return tl.load(ptrs, mask=in_range[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _attend_tile(q, k, v, acc, m_i, l_i, visible, qk_scale, MASKED: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One online-softmax step over a key tile (``visible``: [rows, BLOCK_N], used with
    MASKED). Every row must see a key in its first tile: a row masked out everywhere so
    far would turn m_i - m_new into NaN."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _decode_split_kernel(
    q, k_cache, v_cache, out, part_out, part_lse, seq_lens, block_table, qk_scale,
    stride_q_b, stride_q_h, stride_o_b, stride_o_h,
    stride_k_block, stride_k_token, stride_k_head,
    stride_v_block, stride_v_token, stride_v_head, stride_table,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IS_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (sequence, KV head, split): the split's share of the context for all G query
    heads. With one split it writes ``out``; else a normalised partial and its log2-sum-exp,
    merged by _decode_merge_kernel. Empty splits (and seq_len 0) write zeros and -inf."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(seq_lens + b)
    # Splits are whole tiles: tiles_per_split adapts to this sequence's length, so one
    # captured graph (a fixed split count) serves every length.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_g
    is_head = offs_g < GROUP
    q_ptrs = q + b * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :]
    q_tile = tl.load(q_ptrs, mask=is_head[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table_row = block_table + b * stride_table
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        in_range = pos < end
        k = _load_kv_tile(k_cache, table_row, pos, in_range, kv_head * stride_k_head,
                          stride_k_block, stride_k_token, offs_d, BLOCK_SIZE, True)  # fmt: skip
        v = _load_kv_tile(v_cache, table_row, pos, in_range, kv_head * stride_v_head,
                          stride_v_block, stride_v_token, offs_d, BLOCK_SIZE, True)  # fmt: skip
        acc, m_i, l_i = _attend_tile(q_tile, k, v, acc, m_i, l_i, in_range[None, :], qk_scale,
                                     True, DOT_PRECISION)  # fmt: skip

    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty split stays all zeros
    if not IS_SPLIT:
        o_ptrs = out + b * stride_o_b + heads[:, None] * stride_o_h + offs_d[None, :]
        tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=is_head[:, None])
    else:
        # part_out: [B, Hq, num_splits, D], part_lse: [B, Hq, num_splits], both contiguous
        row = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(part_out + row[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=is_head[:, None])  # fmt: skip
        is_empty = l_i == 0
        lse = tl.where(is_empty, float("-inf"), m_i + tl.log2(tl.where(is_empty, 1.0, l_i)))
        tl.store(part_lse + row, lse, mask=is_head)


@triton.jit
def _decode_merge_kernel(part_out, part_lse, out, stride_o_b, stride_o_h, num_splits,
                         SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """Program (sequence, query head): weight each split's partial by its share of the
    softmax mass. All splits empty (seq_len 0) gives zeros."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    is_split = offs_s < num_splits
    row = (b * tl.num_programs(1) + head) * num_splits + offs_s
    lse = tl.load(part_lse + row, mask=is_split, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp2(lse - lse_max)
    parts = tl.load(part_out + row[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=is_split[:, None], other=0.0)  # fmt: skip
    total = tl.sum(weight, 0)
    merged = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_ptrs = out + b * stride_o_b + head * stride_o_h + offs_d
    tl.store(o_ptrs, merged.to(out.dtype.element_ty))


@triton.jit
def _prefill_kernel(
    q, k_cache, v_cache, out, query_start_loc, seq_lens, block_table, qk_scale,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_k_block, stride_k_token, stride_k_head,
    stride_v_block, stride_v_token, stride_v_head, stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (query tile, KV head, sequence): BLOCK_Q new tokens x G query heads
    (= BLOCK_M rows, some padding when G does not divide BLOCK_M). Query token i of a
    sequence sits at position ctx_start + i and sees keys 0..ctx_start + i."""
    # NOTE: tiles run last-first: the last tiles of a long prompt see the most keys, so
    # starting them early keeps the tail of the grid short.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    first = q_block * BLOCK_Q
    if first >= q_len:
        return
    ctx_start = tl.load(seq_lens + b) - q_len

    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    token = first + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    is_row = (rows < BLOCK_Q * GROUP) & (token < q_len)
    q_ptrs = q + (q_start + token)[:, None] * stride_q_t + heads[:, None] * stride_q_h
    q_tile = tl.load(q_ptrs + offs_d[None, :], mask=is_row[:, None], other=0.0)
    q_pos = ctx_start + token

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table_row = block_table + b * stride_table
    k_head = kv_head * stride_k_head
    v_head = kv_head * stride_v_head
    # Keys below ctx_start + first + 1 are visible to every row: no mask there. The rest,
    # up to the tile's last query, is the causal diagonal.
    diag_start = (ctx_start + first + 1) // BLOCK_N * BLOCK_N
    key_end = ctx_start + tl.minimum(first + BLOCK_Q, q_len)
    for tile_start in range(0, diag_start, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        k = _load_kv_tile(k_cache, table_row, pos, None, k_head, stride_k_block,
                          stride_k_token, offs_d, BLOCK_SIZE, False)  # fmt: skip
        v = _load_kv_tile(v_cache, table_row, pos, None, v_head, stride_v_block,
                          stride_v_token, offs_d, BLOCK_SIZE, False)  # fmt: skip
        acc, m_i, l_i = _attend_tile(q_tile, k, v, acc, m_i, l_i, None, qk_scale, False,
                                     DOT_PRECISION)  # fmt: skip
    for tile_start in range(diag_start, key_end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        in_range = pos < key_end
        k = _load_kv_tile(k_cache, table_row, pos, in_range, k_head, stride_k_block,
                          stride_k_token, offs_d, BLOCK_SIZE, True)  # fmt: skip
        v = _load_kv_tile(v_cache, table_row, pos, in_range, v_head, stride_v_block,
                          stride_v_token, offs_d, BLOCK_SIZE, True)  # fmt: skip
        visible = (pos[None, :] <= q_pos[:, None]) & in_range[None, :]
        acc, m_i, l_i = _attend_tile(q_tile, k, v, acc, m_i, l_i, visible, qk_scale, True,
                                     DOT_PRECISION)  # fmt: skip

    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out + (q_start + token)[:, None] * stride_o_t + heads[:, None] * stride_o_h
    tl.store(o_ptrs + offs_d[None, :], acc.to(out.dtype.element_ty), mask=is_row[:, None])


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    num_splits: int,
    config: DecodeConfig | None = None,
) -> None:
    """One query token per sequence. q, out: [B, Hq, D]; seq_lens: [B] int32, the context
    length including the new token (0: a padding row, which gets zeros); block_table:
    [B, max_blocks] int32. ``num_splits`` (host int, see decode_num_splits) splits each
    context over that many programs, merged by log-sum-exp."""
    batch_size, num_heads, head_dim = q.shape
    group = _check_shapes(q, k_cache, v_cache, out, block_table)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    config = config or decode_config(q.dtype, head_dim, q.device)
    num_kv_heads = k_cache.shape[2]
    part_out = part_lse = out  # unused with one split
    if num_splits > 1:
        part_out = q.new_empty((batch_size, num_heads, num_splits, head_dim), dtype=torch.float32)
        part_lse = q.new_empty((batch_size, num_heads, num_splits), dtype=torch.float32)
    _decode_split_kernel[(batch_size, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, seq_lens, block_table, scale * LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        GROUP=group, GROUP_PAD=max(MIN_DOT_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], BLOCK_N=config.block_n,
        IS_SPLIT=num_splits > 1, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _decode_merge_kernel[(batch_size, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim, num_warps=4 if q.is_cuda else 1,
        )  # fmt: skip


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_query_len: int,
    config: PrefillConfig | None = None,
) -> None:
    """Causal attention of new tokens over their whole context. q, out: [T, Hq, D], the
    batch's new tokens flattened; query_start_loc: [B+1] int32; seq_lens: [B] int32, the
    context length including the new tokens, so sequence b's query i sits at position
    seq_lens[b] - q_len_b + i (a prefix-cache hit or a later prefill chunk starts past 0).
    ``max_query_len`` (host int) sizes the grid."""
    group = _check_shapes(q, k_cache, v_cache, out, block_table)
    config = config or prefill_config(q.dtype, q.shape[2], q.device)
    block_m = max(config.block_m, triton.next_power_of_2(group))
    block_q = block_m // group  # new tokens per program
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    grid = (triton.cdiv(max(max_query_len, 1), block_q), num_kv_heads, num_seqs)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_table, scale * LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        GROUP=group, HEAD_DIM=q.shape[2], BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=config.block_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def _check_shapes(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_table: torch.Tensor,
) -> int:
    """Checks the layouts the kernels assume; returns G, the query heads per KV head."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape or cache_head_dim != head_dim or out.shape != q.shape:
        raise ValueError(f"shapes disagree: q {q.shape}, k/v cache {k_cache.shape}/"
                         f"{v_cache.shape}, out {out.shape}")  # fmt: skip
    if head_dim < 16 or not _is_power_of_2(head_dim) or not _is_power_of_2(block_size):
        raise ValueError(f"head_dim ({head_dim}, >= 16) and block_size ({block_size}) "
                         "must be powers of two")  # fmt: skip
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads not a multiple of {num_kv_heads} KV heads")
    if any(t.stride(-1) != 1 for t in (q, out, k_cache, v_cache, block_table)):
        raise ValueError("q, out, the caches and block_table need a contiguous last dim")
    if block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32, got {block_table.dtype}")
    return num_heads // num_kv_heads


def _dot_precision(dtype: torch.dtype) -> str | None:
    # NOTE: float32 uses exact fp32 products: the default (TF32) would break parity with
    # the float32 reference; 16-bit inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else None


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
