"""The router's policies as pure choices over candidates (no processes)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pd.router.policy import (
    POLICY_NAMES,
    CacheAware,
    Candidate,
    common_prefix_len,
    make_policy,
)

A, B, C = Candidate("http://a", 0), Candidate("http://b", 0), Candidate("http://c", 0)


def picks(policy, candidates, num: int, prompt: str = "p") -> Counter:
    return Counter(policy.pick(candidates, prompt).key for _ in range(num))


def test_round_robin_takes_turns_in_key_order_whatever_the_order_given():
    policy = make_policy("round_robin")
    keys = [policy.pick([C, A, B], "p").key for _ in range(6)]
    assert keys == ["http://a", "http://b", "http://c"] * 2


def test_random_spreads_and_is_reproducible_with_a_seed():
    counts = picks(make_policy("random", random.Random(0)), [A, B], 1000)
    assert 400 < counts["http://a"] < 600
    again = picks(make_policy("random", random.Random(0)), [A, B], 1000)
    assert counts == again


def test_power_of_two_never_picks_the_most_loaded_of_three():
    busy = Candidate("http://busy", 10)
    counts = picks(make_policy("power_of_two", random.Random(1)), [A, B, busy], 300)
    assert counts["http://busy"] == 0 and counts["http://a"] > 0 and counts["http://b"] > 0


def test_power_of_two_with_one_candidate_picks_it():
    assert make_policy("power_of_two").pick([A], "p") == A


def test_least_load_picks_the_least_loaded_at_random_among_equals():
    policy = make_policy("least_load", random.Random(2))
    loaded = [Candidate("http://a", 3), Candidate("http://b", 1), Candidate("http://c", 1)]
    counts = picks(policy, loaded, 200)
    assert counts["http://a"] == 0 and counts["http://b"] > 50 and counts["http://c"] > 50


def test_cache_aware_follows_the_longest_shared_prefix():
    policy = CacheAware(random.Random(3), max_load_gap=4, min_prefix_chars=8)
    system = "You are a helpful assistant. " * 4
    first = policy.pick([A, B], system + "question one").key
    other = policy.pick([Candidate(first, 1), B if first == A.key else A], "unrelated").key
    assert other != first  # nothing shared: the least loaded
    for i in range(10):
        loads = [Candidate(A.key, 2), Candidate(B.key, 2)]
        assert policy.pick(loads, system + f"question {i}").key == first
    assert policy.shared_prefix_len(first, system + "question x") == len(system + "question ")


def test_cache_aware_yields_to_load_past_the_gap():
    policy = CacheAware(random.Random(4), max_load_gap=4, min_prefix_chars=8)
    prompt = "a long shared system prompt, then "
    policy.pick([A], prompt + "x")
    near = [Candidate(A.key, 4), Candidate(B.key, 0)]
    assert policy.pick(near, prompt + "y").key == A.key  # within the gap: affinity
    far = [Candidate(A.key, 5), Candidate(B.key, 0)]
    assert policy.pick(far, prompt + "z").key == B.key  # past it: the least loaded


def test_cache_aware_ignores_short_matches_and_forgets_a_gone_instance():
    policy = CacheAware(random.Random(5), max_load_gap=4, min_prefix_chars=8)
    policy.pick([A], "abc-one")
    assert policy.pick([Candidate(A.key, 1), B], "abc-two").key == B.key  # 4 chars < 8
    policy.pick([A], "0123456789 shared")
    policy.forget(A.key)
    assert policy.shared_prefix_len(A.key, "0123456789 shared") == 0


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("", "", 0), ("abc", "", 0), ("abc", "abd", 2), ("abc", "abc", 3), ("abc", "abcdef", 3),
    ("x" * 1000 + "y", "x" * 1000 + "z", 1000),
])  # fmt: skip
def test_common_prefix_len(a, b, expected):
    assert common_prefix_len(a, b) == expected == common_prefix_len(b, a)


def test_every_named_policy_is_made_and_an_unknown_one_refused():
    for name in POLICY_NAMES:
        assert make_policy(name).pick([A], "p") == A
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        make_policy("fastest")
