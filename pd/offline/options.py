"""The offline ``LLM``'s keywords beyond one engine's: which DP ranks it runs and where
they meet, their engine-worker-queue ports (read as ``pd-serve`` reads its flag), and
the cluster scheduler they join. Each is checked here, with the keyword's name."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

from pd.args import pick_free_port
from pd.args_validation import parse_port_list
from pd.dp_layout import DPLayout, rank_ports
from scheduler.config import SchedulerConfig

logger = logging.getLogger("pd.llm")


@dataclass(frozen=True)
class DataParallelPlacement:
    """Which DP ranks this ``LLM`` runs, and where the DP group meets (a store that DP
    rank 0 hosts at ``address:rpc_port``).

    - ``rank`` None: every rank; with more than one, each runs in an engine-core
      process of its own (the ``LLM`` places requests on them);
    - ``rank`` r: only rank r, in this process (vLLM's one process per DP rank: the
      other ranks' ``LLM``s run elsewhere with the same size, address and port, each
      with its own prompts). ``rank_local`` is its place among the ranks on this host
      (it takes GPUs from ``rank_local * tensor_parallel_size`` on; default: ``rank``).
    """

    size: int = 1
    rank: int | None = None
    rank_local: int | None = None
    address: str = "127.0.0.1"
    rpc_port: int = 0  # 0: a free one, when this LLM runs every rank

    def __post_init__(self) -> None:
        _check_int("data_parallel_size", self.size, 1)
        _check_int("data_parallel_rpc_port", self.rpc_port, 0, 65535)
        if self.rank is not None:
            _check_int("data_parallel_rank", self.rank, 0, self.size - 1)
            if self.size > 1 and not self.rpc_port:
                raise ValueError(
                    f"data_parallel_rank {self.rank} of {self.size}: the other ranks run "
                    "elsewhere and meet at data_parallel_address:data_parallel_rpc_port "
                    "(DP rank 0's host and a free port there); give data_parallel_rpc_port"
                )
        if self.rank_local is not None:
            if self.rank is None:
                raise ValueError("data_parallel_rank_local needs data_parallel_rank")
            _check_int("data_parallel_rank_local", self.rank_local, 0)

    @property
    def ranks(self) -> list[int]:
        """The global DP ranks this LLM runs."""
        return list(range(self.size)) if self.rank is None else [self.rank]

    @property
    def runs_in_process(self) -> bool:
        """One rank to run: the engine core can live in this process."""
        return len(self.ranks) == 1

    @property
    def layout(self) -> DPLayout:
        return DPLayout(self.size, self.ranks[0], len(self.ranks))

    def local_index(self, dp_rank: int) -> int:
        """The rank's place among those on this host (its GPUs come in that order)."""
        if self.rank is None:
            return dp_rank
        return self.rank if self.rank_local is None else self.rank_local

    def master_port(self) -> int:
        """The DP group's port: given, or free here (this LLM runs every rank); 0 alone."""
        if self.size == 1:
            return 0
        return self.rpc_port or pick_free_port(self.address)

    def engine_kwargs(
        self, engine_options: dict[str, Any], dp_rank: int, master_port: int
    ) -> dict[str, Any]:
        """DP rank ``dp_rank``'s ``make_engine_config`` keywords, plain values only (an
        engine process unpickles them before it may import torch)."""
        data_parallel = {  # engine.config.DataParallelConfig's fields
            "rank": dp_rank,
            "size": self.size,
            "master_host": self.address,
            "master_port": master_port,
        }
        offset = self.local_index(dp_rank) * engine_options["tensor_parallel_size"]
        return {**engine_options, "device_offset": offset, "data_parallel": data_parallel}


def queue_ports(value: str | int | list[int] | None, placement: DataParallelPlacement) -> list[int]:
    """``engine_worker_queue_port`` for each rank this LLM runs (0: a free one): "6077,6078"
    or a list, one per DP rank, one to count up from, or more (the rest unused), as
    ``pd-serve --engine-worker-queue-port`` reads it (``pd/dp_layout.py``)."""
    if value is None:
        return [0] * len(placement.ranks)
    try:
        if isinstance(value, str):
            ports = parse_port_list(value)
        else:
            ports = [value] if isinstance(value, int) else list(value)
            parse_port_list(",".join(map(str, ports)))  # the same checks per entry
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"engine_worker_queue_port: {e}") from None
    read = rank_ports("engine_worker_queue_port", ports, placement.layout)
    if read.note:
        logger.info("%s", read.note)
    return [rank[0] for rank in read.per_rank]


def scheduler_config(
    name: str,
    host: str,
    port: int,
    topic: str,
    password: str | None,
    ttl: float,
    expire_period: int,
    db: int = 0,
) -> SchedulerConfig:
    """The ``scheduler_*`` keywords (FastDeploy's); without a password, the one derived
    from the cluster secret (``PD_CLUSTER_SECRET``), as ``pd-serve`` derives it."""
    if password is None and name == "splitwise":
        from pd.cluster_secret import load_cluster_secret, redis_password

        secret = load_cluster_secret(None)
        password = None if secret is None else redis_password(secret)
    return SchedulerConfig(
        name=name, host=host, port=port, db=db, password=password, topic=topic, ttl_s=ttl,
        expire_period_ms=expire_period,
    )  # fmt: skip


def plain_dtype(dtype: Any) -> str:
    """A dtype keyword as its name (a torch.dtype too): engine processes get plain values."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {high}, got {value}")
