"""Which DP ranks one ``pd-serve`` runs, and the ports each of them gets.

An instance has ``--data-parallel-size`` DP ranks, possibly over several hosts (or
several ``pd-serve`` processes, as the multi-API-server starts them): this process runs
``--data-parallel-size-local`` of them from ``--data-parallel-start-rank`` on. Port
lists are read the way the FastDeploy and vLLM docs write them:

- one entry per DP rank of the instance (per GPU for ``--rdma-comm-ports``): rank r
  takes entry r, wherever it runs;
- one entry per local rank (a host of a multi-host instance): in local order;
- one entry for several ranks (``--pd-comm-port 2334`` with four DP ranks): rank r
  takes ``port + r``, printed at start-up; 0 stays 0 (each picked free);
- more entries than ranks (eight ``--engine-worker-queue-port`` entries for four DP
  ranks, as a FastDeploy doc does): the first ones are used, and the rest are named in
  the start-up log as unused.

Any other count is an error naming the flag. Standard library only (``pd-serve --help``).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PORT = 65535

# The port lists read per DP rank: ServeArgs field -> (flag, one port per GPU, not per rank).
RANK_PORT_FLAGS = {
    "engine_worker_queue_ports": ("--engine-worker-queue-port", False),
    "cache_queue_ports": ("--cache-queue-port", False),
    "pd_comm_ports": ("--pd-comm-port", False),
    "rdma_comm_ports": ("--rdma-comm-ports", True),
}


@dataclass(frozen=True)
class DPLayout:
    size: int  # DP ranks of the instance
    start: int = 0  # the first DP rank this process runs
    local: int = 1  # how many it runs
    tp: int = 1  # GPUs (TP ranks) per DP rank

    def __post_init__(self) -> None:
        if self.start < 0 or self.local < 1 or self.start + self.local > self.size:
            raise ValueError(
                f"--data-parallel-start-rank {self.start} with --data-parallel-size-local "
                f"{self.local} runs DP ranks past --data-parallel-size {self.size}"
            )

    @property
    def ranks(self) -> range:
        """The global DP ranks this process runs."""
        return range(self.start, self.start + self.local)

    @property
    def spans_processes(self) -> bool:
        """Other processes (or hosts) run some of the instance's DP ranks."""
        return self.local < self.size


@dataclass(frozen=True)
class RankPorts:
    """One flag's ports, per local DP rank, and what the start-up log should say."""

    per_rank: list[list[int]]  # [local rank][slot]; slot: 0, or the TP rank (per GPU)
    note: str | None = None  # derived or unused entries, for the log


def rank_ports(flag: str, ports: list[int], layout: DPLayout, per_rank: int = 1) -> RankPorts:
    """The ports of ``flag`` for this process's DP ranks (``per_rank`` slots each: 1,
    or the TP size for a per-GPU list). Raises ValueError on a count that fits no
    reading."""
    total, local = layout.size * per_rank, layout.local * per_rank
    unit = "GPU" if per_rank > 1 else "DP rank"
    first = layout.start * per_rank
    if len(ports) >= total:
        chosen, offset = ports, first
    elif len(ports) == local:
        chosen, offset = ports, 0
    elif len(ports) == 1:
        base = ports[0]
        derived = [0 if base == 0 else base + first + i for i in range(local)]
        if derived[-1] > MAX_PORT:
            raise ValueError(
                f"{flag} {base} counted up for {_plural(local, unit)} reaches "
                f"{derived[-1]}, past {MAX_PORT}: give a lower port, or one per {unit}"
            )
        note = None
        if base and local > 1:
            note = f"{flag} {base} for {local} ranks: {','.join(map(str, derived))}"
        return RankPorts(_split(derived, per_rank), note)
    else:
        here = f", one per {unit} of this process ({local})" if local < total else ""
        raise ValueError(
            f"{flag} has {_plural(len(ports), 'port')}; give one per {unit} ({total})"
            f"{here}, or one to count up from"
        )
    mine = chosen[offset : offset + local]
    note = None
    if len(ports) > total:
        unused = ports[total:]
        note = f"{flag}: {_plural(len(unused), 'entry', 'entries')} past the {total} used: " + (
            ",".join(map(str, unused))
        )
    return RankPorts(_split(mine, per_rank), note)


def _split(ports: list[int], per_rank: int) -> list[list[int]]:
    return [ports[i : i + per_rank] for i in range(0, len(ports), per_rank)]


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
