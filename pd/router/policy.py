"""How the router picks an instance for a request: pure choices over a snapshot.

A policy sees only ``Candidate`` records (an instance's key and its load) and the
request's prompt text; it never touches the registry or the network, so each one is
testable on its own. Some keep a little state of their own: round_robin a cursor,
cache_aware the recent prompts it sent to each instance.

- ``round_robin``: each instance in turn.
- ``random``: uniformly at random.
- ``power_of_two``: two at random, the less loaded of them.
- ``least_load``: the least loaded (at random among equals).
- ``cache_aware``: the instance whose recent prompts share the longest prefix with this
  one (its prefix cache likely holds it), unless that instance's load exceeds the least
  load by more than ``max_load_gap``, or nothing shares ``min_prefix_chars``; then the
  least loaded.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

POLICY_NAMES = ("round_robin", "random", "power_of_two", "least_load", "cache_aware")


@dataclass(frozen=True)
class Candidate:
    """An instance the request may go to."""

    key: str  # the instance's URL: stable across its heartbeats
    load: int  # its requests in flight (the larger of the router's count and its report)


class Policy(Protocol):
    def pick(self, candidates: Sequence[Candidate], prompt: str) -> Candidate:
        """One of ``candidates`` (never empty) for a request with this prompt text."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Candidate], prompt: str) -> Candidate:
        # NOTE: ordered by key, so that the turn does not depend on registration order.
        ordered = sorted(candidates, key=lambda c: c.key)
        choice = ordered[self._next % len(ordered)]
        self._next += 1
        return choice


class RandomPick:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Candidate], prompt: str) -> Candidate:
        return self._rng.choice(list(candidates))


class PowerOfTwo:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Candidate], prompt: str) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(list(candidates), 2)
        return first if first.load <= second.load else second


class LeastLoad:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Candidate], prompt: str) -> Candidate:
        return least_loaded(candidates, self._rng)


class CacheAware:
    def __init__(
        self,
        rng: random.Random,
        max_load_gap: int = 8,
        min_prefix_chars: int = 16,
        max_prompts_per_instance: int = 256,
    ) -> None:
        self._rng = rng
        self.max_load_gap = max_load_gap
        self.min_prefix_chars = min_prefix_chars
        self._max_prompts = max_prompts_per_instance
        self._recent: dict[str, deque[str]] = {}

    def pick(self, candidates: Sequence[Candidate], prompt: str) -> Candidate:
        least = min(c.load for c in candidates)
        matches = [(self.shared_prefix_len(c.key, prompt), c) for c in candidates]
        best_len = max(length for length, _ in matches)
        best = [c for length, c in matches if length == best_len]
        affine = [c for c in best if c.load <= least + self.max_load_gap]
        if best_len >= self.min_prefix_chars and affine:
            choice = least_loaded(affine, self._rng)
        else:
            choice = least_loaded(candidates, self._rng)
        self._remember(choice.key, prompt)
        return choice

    def shared_prefix_len(self, key: str, prompt: str) -> int:
        """The longest prefix ``prompt`` shares with a prompt recently sent to ``key``."""
        return max((common_prefix_len(prompt, seen) for seen in self._recent.get(key, ())),
                   default=0)  # fmt: skip

    def forget(self, key: str) -> None:
        """Drop what was sent to an instance that left (a restarted one starts cold)."""
        self._recent.pop(key, None)

    def _remember(self, key: str, prompt: str) -> None:
        self._recent.setdefault(key, deque(maxlen=self._max_prompts)).append(prompt)


def least_loaded(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    least = min(c.load for c in candidates)
    return rng.choice([c for c in candidates if c.load == least])


def common_prefix_len(a: str, b: str) -> int:
    """Binary search over slice comparisons (done in C): O(log n) of them."""
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low]; a[:high + 1] differs
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def make_policy(name: str, rng: random.Random | None = None, **cache_aware: int) -> Policy:
    """The policy called ``name`` (one of POLICY_NAMES); ``cache_aware``: CacheAware's
    thresholds."""
    rng = rng or random.Random()
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return RandomPick(rng)
    if name == "power_of_two":
        return PowerOfTwo(rng)
    if name == "least_load":
        return LeastLoad(rng)
    if name == "cache_aware":
        return CacheAware(rng, **cache_aware)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
