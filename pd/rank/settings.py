"""What an engine rank needs to join a splitwise cluster, over Redis or paired by
pd-router (built by ``pd-serve`` from its flags, handed to the spawned engine process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.config import SchedulerConfig


@dataclass(frozen=True)
class RankSettings:
    role: str  # prefill | decode | mixed
    rank_id: str  # unique in the topic: "<instance id>.dp<rank>"
    host: str  # where peers reach this rank (pd-comm, tcp transfers)
    model: str  # the served model name: part of the KV compatibility fingerprint
    scheduler: SchedulerConfig
    protocols: list[str]  # KV-transfer protocols offered (usable ones only)
    api_port: int = 0
    pd_comm_port: int = 0  # 0: a free one
    rdma_comm_ports: list[int] = field(default_factory=lambda: [0])
    handoff_timeout_s: float = 30.0  # a prefill rank's wait for its KV writes + Commit
    lease_s: float = 10.0  # a decode rank's reservation lease
    # The cluster secret (pd/cluster_secret.py): pd-comm calls and KV streams prove it.
    secret: bytes | None = field(default=None, repr=False)
    # pd-router --splitwise pairs the requests; no Redis (scheduler/direct_rank.py)
    paired_by_router: bool = False
