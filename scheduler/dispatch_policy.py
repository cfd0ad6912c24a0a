"""Which prefill rank and which decode rank serve a request: a pure function of a
registry snapshot, so it is tested without Redis.

Least load wins; ranks whose load is within ``tolerance`` of the least are
equals, and one of them is picked at random so that many API servers reading
the same snapshot do not all stampede one rank. Mixed ranks are prefill
candidates too, and one that is picked may decode the request itself. A
decode rank must share a KV-transfer protocol with the prefill rank (ipc only
on the same host).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class RankLoad:
    """One live DP rank as the registry reports it (the policy's view of a record)."""

    rank_id: str
    role: str  # prefill | decode | mixed
    host: str
    protocols: tuple[str, ...]  # KV-transfer protocols offered: rdma, ipc, tcp
    num_running: int = 0
    num_waiting: int = 0
    num_queued_prompt_tokens: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 1
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"rank {self.rank_id}: role must be one of {ROLES}, not {self.role!r}")

    def can_hold(self, num_tokens: int) -> bool:
        return self.num_free_blocks * self.block_size >= num_tokens


@dataclass(frozen=True)
class Dispatch:
    prefill: RankLoad
    decode: RankLoad  # the prefill rank itself when a mixed rank runs the whole request
    protocol: str | None  # None when one rank runs the whole request

    @property
    def is_disaggregated(self) -> bool:
        return self.prefill.rank_id != self.decode.rank_id


class NoRankAvailable(RuntimeError):
    """No live rank can take the request; the message says which role is missing."""


def prefill_cost(rank: RankLoad) -> float:
    """Prompt tokens ahead of a new request (waiting requests break ties)."""
    return rank.num_queued_prompt_tokens + rank.num_waiting


def decode_cost(rank: RankLoad, num_prompt_tokens: int) -> float:
    """Sequences sharing each decode step; a rank without room for the prompt's
    KV counts as busier than any rank with room."""
    cost = rank.num_running + rank.num_waiting + 1 - rank.num_free_blocks / max(rank.num_blocks, 1)
    return cost if rank.can_hold(num_prompt_tokens) else cost + 1e9


def transfer_protocol(prefill: RankLoad, decode: RankLoad) -> str | None:
    """The protocol a pair would use: ipc on one host, else rdma, else tcp."""
    return explain_protocol(prefill, decode)[0]


def explain_protocol(prefill: RankLoad, decode: RankLoad) -> tuple[str | None, str]:
    """(protocol or None, why): the rule of DESIGN.md "KV cache and transfer". Ranks
    offer rdma only when they have a usable device (cache_transfer.protocols)."""
    common = set(prefill.protocols) & set(decode.protocols)
    same_host = prefill.host == decode.host
    if "ipc" in common and same_host:
        return "ipc", f"both ranks on host {prefill.host}"
    where = "one host, but ipc is not offered by both" if same_host else "different hosts"
    if "rdma" in common:
        return "rdma", f"{where}; both offer rdma"
    if "tcp" in common:
        return "tcp", f"{where}; rdma not offered by both"
    return None, (
        f"no common protocol: prefill {prefill.rank_id} offers {list(prefill.protocols)}, "
        f"decode {decode.rank_id} offers {list(decode.protocols)}"
    )


def near_least(
    ranks: Sequence[RankLoad], cost: dict[str, float], tolerance: float, rng: random.Random
) -> RankLoad:
    """A random rank among those within ``tolerance`` (relative, at least 1) of the least cost."""
    least = min(cost[r.rank_id] for r in ranks)
    limit = least + max(abs(least) * tolerance, 1.0)
    return rng.choice([r for r in ranks if cost[r.rank_id] < limit])


def pick_decode(
    prefill: RankLoad,
    decodes: Sequence[RankLoad],
    num_prompt_tokens: int,
    rng: random.Random,
    tolerance: float = 0.1,
) -> RankLoad | None:
    """The decode rank for a prefill rank's request: least decode cost among those that
    share a KV-transfer protocol with it (a near-equal pick); None when none does."""
    paired = [d for d in decodes if transfer_protocol(prefill, d) is not None]
    if not paired:
        return None
    cost = {r.rank_id: decode_cost(r, num_prompt_tokens) for r in paired}
    return near_least(paired, cost, tolerance, rng)


def dispatch(
    snapshot: Sequence[RankLoad],
    num_prompt_tokens: int,
    rng: random.Random,
    tolerance: float = 0.1,
) -> Dispatch:
    """Pick the prefill and decode ranks for a prompt of ``num_prompt_tokens``."""
    prefills = [r for r in snapshot if r.role in ("prefill", "mixed")]
    decodes = [r for r in snapshot if r.role == "decode"]
    if not prefills:
        raise NoRankAvailable("no live prefill or mixed rank is registered")
    p_cost = {r.rank_id: prefill_cost(r) for r in prefills}
    remaining = list(prefills)
    while remaining:
        prefill = near_least(remaining, p_cost, tolerance, rng)
        if prefill.role == "mixed":
            return Dispatch(prefill, prefill, None)
        decode = pick_decode(prefill, decodes, num_prompt_tokens, rng, tolerance)
        if decode is not None:
            return Dispatch(prefill, decode, transfer_protocol(prefill, decode))
        remaining.remove(prefill)
    if not decodes:
        raise NoRankAvailable("no live decode rank is registered (and no mixed rank)")
    raise NoRankAvailable(
        "no decode rank shares a KV-transfer protocol with any prefill rank "
        f"(prefill offers {sorted({p for r in prefills for p in r.protocols})}, "
        f"decode offers {sorted({p for r in decodes for p in r.protocols})})"
    )
