from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def make_seq(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(), arrival=0)


def warm_and_free(manager: BlockManager, tokens: list[int]) -> None:
    """Compute ``tokens`` once and free them: their full blocks stay cached."""
    seq = make_seq(tokens, "warm")
    manager.allocate(seq, len(tokens))
    seq.num_computed_tokens = len(tokens)
    manager.cache_computed_blocks(seq)
    manager.free(seq)


def test_allocate_append_free_returns_every_block():
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    assert manager.can_allocate(seq, 10)
    manager.allocate(seq, 10)
    assert len(seq.block_ids) == 3 and manager.num_free_blocks == 5
    seq.num_computed_tokens = 10
    seq.token_ids.append(99)
    assert manager.can_append(seq, 1)
    manager.append(seq, 1)  # 11 tokens still fit in 3 blocks
    assert len(seq.block_ids) == 3
    seq.num_computed_tokens = 11
    seq.token_ids.append(100)
    manager.append(seq, 1)
    seq.num_computed_tokens = 12
    seq.token_ids.append(101)
    manager.append(seq, 1)  # token 13 opens a fourth block
    assert len(seq.block_ids) == 4
    manager.check_invariants(live=[seq])
    manager.free(seq)
    assert manager.num_free_blocks == 8 and seq.block_ids == []
    manager.check_invariants(live=[])


def test_can_predicates_refuse_without_side_effects():
    manager = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(12)))
    assert not manager.can_allocate(seq, 12)
    with pytest.raises(RuntimeError):
        manager.allocate(seq, 12)
    assert manager.num_free_blocks == 2 and seq.block_ids == []
    manager.check_invariants(live=[])


def test_prefix_hits_share_blocks_and_leave_one_token_to_compute():
    manager = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(10)), "a")
    manager.allocate(first, 10)
    first.num_computed_tokens = 10
    manager.cache_computed_blocks(first)  # two full blocks published
    second = make_seq([*range(9), 42], "b")
    manager.allocate(second, 2)
    assert second.num_computed_tokens == 8
    assert second.block_ids[:2] == first.block_ids[:2]
    manager.check_invariants(live=[first, second])
    # A prompt that is exactly two full cached blocks still recomputes its last token.
    third = make_seq(list(range(8)), "c")
    manager.allocate(third, 4)
    assert third.num_computed_tokens == 4
    manager.check_invariants(live=[first, second, third])
    for seq in (first, second, third):
        manager.free(seq)
    manager.check_invariants(live=[])
    assert manager.num_free_blocks == 16


def test_freed_cached_blocks_are_reused_until_evicted_lru():
    manager = BlockManager(num_blocks=4, block_size=2)
    warm_and_free(manager, [1, 2, 3, 4])
    assert manager.num_free_blocks == 4 and len(manager.cached) == 2
    again = make_seq([1, 2, 3, 4, 5], "again")
    manager.allocate(again, 1)
    assert again.num_computed_tokens == 4  # both blocks hit after being freed
    manager.free(again)
    # Filling the pool with other content evicts the cached blocks.
    other = make_seq(list(range(100, 108)), "other")
    manager.allocate(other, 8)
    assert manager.cached == {}
    manager.check_invariants(live=[other])


def test_hit_blocks_in_the_free_queue_are_not_double_counted():
    manager = BlockManager(num_blocks=3, block_size=2)
    warm_and_free(manager, [1, 2, 3, 4])
    # 2 cached hits (free, ref 0) + 2 new blocks: needs 4 of 3 blocks.
    seq = make_seq([1, 2, 3, 4, 5, 6, 7], "seq")
    assert not manager.can_allocate(seq, 3)
    assert manager.can_allocate(seq, 2)


def test_random_workload_keeps_invariants():
    rng = random.Random(0)
    manager = BlockManager(num_blocks=40, block_size=4)
    live: list[Sequence] = []
    for step in range(2000):
        if live and rng.random() < 0.3:
            seq = live.pop(rng.randrange(len(live)))
            manager.cache_computed_blocks(seq)
            manager.free(seq)
        elif live and rng.random() < 0.5:
            seq = rng.choice(live)
            seq.num_computed_tokens = seq.num_tokens
            manager.cache_computed_blocks(seq)
            seq.token_ids.append(rng.randrange(4))
            if manager.can_append(seq, 1):
                manager.append(seq, 1)
            else:
                live.remove(seq)
                manager.free(seq)
        else:
            prefix = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
            seq = make_seq(prefix, f"s{step}")
            num_cached = len(manager.find_cached_prefix(seq)) * 4
            if manager.can_allocate(seq, seq.num_tokens - num_cached):
                manager.allocate(seq, seq.num_tokens - num_cached)
                live.append(seq)
        manager.check_invariants(live=live)
    for seq in live:
        manager.free(seq)
    manager.check_invariants(live=[])
    assert manager.num_free_blocks == 40
    assert manager.num_prefix_hit_tokens > 0
