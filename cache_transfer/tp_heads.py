"""Which KV heads each TP rank holds, and which heads a prefill TP rank writes to which
decode TP rank when the two instances have different TP sizes.

A model's ``K`` KV heads over ``tp`` ranks: with ``tp <= K`` rank r holds heads
[r*K/tp, (r+1)*K/tp); with ``tp > K`` each head is replicated on tp/K consecutive ranks,
rank r holding head r // (tp/K) (engine.layers.linear.num_local_kv_heads). Each decode
rank needs its heads from a prefill rank that holds them; where several prefill ranks
hold a head, decode rank j takes it from the (j mod copies)-th of them, so no byte is
written twice, the copies share the work, and equal TP sizes pair rank i with rank i.

    K = 2, prefill TP 2 -> decode TP 1:  P0 head 0 -> D0 local 0;  P1 head 1 -> D0 local 1
    K = 2, prefill TP 1 -> decode TP 2:  P0 head 0 -> D0 local 0;  P0 head 1 -> D1 local 0
"""

from __future__ import annotations

from typing import NamedTuple


class HeadWrite(NamedTuple):
    """Heads [src_first, src_first + count) of this rank's pool -> heads [dst_first, ...)
    of decode TP rank ``dst_rank``'s pool (local head indices on both sides)."""

    dst_rank: int
    src_first: int
    dst_first: int
    count: int


def rank_heads(total_kv_heads: int, tp_size: int, rank: int) -> range:
    """The global KV heads TP rank ``rank`` of ``tp_size`` holds."""
    if total_kv_heads < 1 or tp_size < 1 or not 0 <= rank < tp_size:
        raise ValueError(f"no rank {rank} of {tp_size} over {total_kv_heads} KV heads")
    if tp_size <= total_kv_heads:
        if total_kv_heads % tp_size:
            raise ValueError(f"TP {tp_size} does not divide {total_kv_heads} KV heads")
        per_rank = total_kv_heads // tp_size
        return range(rank * per_rank, (rank + 1) * per_rank)
    if tp_size % total_kv_heads:
        raise ValueError(f"{total_kv_heads} KV heads do not divide TP {tp_size}")
    head = rank // (tp_size // total_kv_heads)
    return range(head, head + 1)


def head_writes(total_kv_heads: int, src_tp: int, src_rank: int, dst_tp: int) -> list[HeadWrite]:
    """What prefill TP rank ``src_rank`` of ``src_tp`` writes into a decode instance of
    ``dst_tp`` ranks: for each decode rank, the heads it needs that this rank is the
    writer of (possibly none)."""
    mine = rank_heads(total_kv_heads, src_tp, src_rank)
    writes = []
    for dst_rank in range(dst_tp):
        needed = rank_heads(total_kv_heads, dst_tp, dst_rank)
        heads = [
            h for h in mine
            if h in needed and _writer(total_kv_heads, src_tp, h, dst_rank) == src_rank
        ]  # fmt: skip
        if heads:  # contiguous: one holder per head, or one head per rank
            writes.append(
                HeadWrite(dst_rank, heads[0] - mine.start, heads[0] - needed.start, len(heads))
            )
    return writes


def _writer(total_kv_heads: int, src_tp: int, head: int, dst_rank: int) -> int:
    """The prefill rank that writes ``head`` to decode rank ``dst_rank``."""
    if src_tp <= total_kv_heads:  # one holder
        return head // (total_kv_heads // src_tp)
    copies = src_tp // total_kv_heads  # ranks head*copies .. head*copies + copies - 1
    return head * copies + dst_rank % copies
