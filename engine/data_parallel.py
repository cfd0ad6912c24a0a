"""The DP group: the engine cores of one instance's DP ranks, which may span hosts; and
the MoE group over every DP x TP rank of the instance.

DP ranks run their own requests and share no KV, so serving needs nothing from the
group; it exists for what must agree across ranks. At start-up every rank proves it
serves the same model with the same limits (a rank started with another checkpoint
or another --max-model-len would answer the same request differently); expert
parallelism steps the ranks in lockstep over it. The group is gloo on the CPU
whatever the device: it carries a few integers per call.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import DataParallelConfig, EngineConfig
from engine.distributed import (
    JOIN_TIMEOUT,
    GroupAddress,
    ParallelGroup,
    join_group,
    listening_store,
)

logger = logging.getLogger("engine.data_parallel")


class DataParallelJoinError(RuntimeError):
    """The DP ranks did not all meet within the join timeout."""


@dataclass
class DataParallelGroup:
    """A DP rank's group handle; DP rank 0 also hosts the store the ranks meet at."""

    group: ParallelGroup
    store: dist.TCPStore | None = None  # kept alive with the group

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def size(self) -> int:
        return self.group.size

    def any_busy(self, busy: bool) -> bool:
        """Whether any DP rank has work (a collective: every rank calls it once per loop
        iteration, so lockstep ranks agree on whether this iteration steps)."""
        if self.size == 1:
            return busy
        flag = torch.tensor([int(busy)], dtype=torch.int32)
        self.group.all_reduce(flag)
        return bool(flag.item())


def join_data_parallel_group(
    config: EngineConfig, timeout: datetime.timedelta = JOIN_TIMEOUT
) -> DataParallelGroup:
    """Meet the other DP ranks (raising DataParallelJoinError, naming the missing ones,
    when they are not all there within ``timeout``) and check that they serve the same
    model; a lone rank returns at once."""
    dp = config.data_parallel
    if dp.size == 1:
        return DataParallelGroup(ParallelGroup.single())
    where = f"{dp.master_host}:{dp.master_port}"
    logger.info("DP rank %d of %d: joining the DP group at %s", dp.rank, dp.size, where)
    try:
        if dp.rank == 0:  # it hosts the store, on the DP address only
            store = listening_store(dp.master_host, dp.master_port, dp.size, timeout)
        else:
            store = dist.TCPStore(
                dp.master_host, dp.master_port, dp.size, is_master=False, timeout=timeout
            )
    except (OSError, dist.DistError) as error:
        what = "cannot host" if dp.rank == 0 else "found no"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataParallelJoinError(
            f"DP rank {dp.rank} {what} DP group at {where} (DP rank 0's "
            f"--data-parallel-address and --data-parallel-rpc-port): {reason}"
        ) from None
    _wait_for_every_rank(store, dp, timeout)
    address = GroupAddress(dp.master_host, dp.master_port, dp.size)
    group = join_group(address, dp.rank, torch.device("cpu"), store)
    check_same_model(group, config)
    return DataParallelGroup(group, store)


def _wait_for_every_rank(
    store: dist.TCPStore, dp: DataParallelConfig, timeout: datetime.timedelta
) -> None:
    """A barrier on the store, bounded by ``timeout``. NOTE: gloo's own rendezvous waits
    for a missing rank as long as its collective timeout (10 minutes), in silence."""
    keys = [f"pd/dp_joined/{rank}" for rank in range(dp.size)]
    store.set(keys[dp.rank], "1")
    try:
        store.wait(keys, timeout)
    except dist.DistError:
        try:
            missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
        except dist.DistError:  # DP rank 0, holding the store, is gone too
            missing = [rank for rank in range(dp.size) if rank != dp.rank]
        raise DataParallelJoinError(
            f"DP rank {dp.rank}: DP rank(s) {', '.join(map(str, missing))} of {dp.size} did "
            f"not join the DP group at {dp.master_host}:{dp.master_port} within "
            f"{timeout.total_seconds():.0f} s (not started, failed, or given another "
            "--data-parallel-address/--data-parallel-rpc-port)"
        ) from None


def serving_digest(config: EngineConfig) -> tuple[int, str]:
    """A 62-bit digest of what every DP rank must share, and the same in words."""
    model, cache, limits = config.model, config.cache, config.scheduler
    words = (
        f"{model.architecture} hidden {model.hidden_size} layers {model.num_hidden_layers} "
        f"heads {model.num_attention_heads}/{model.num_key_value_heads} vocab "
        f"{model.vocab_size} {str(model.dtype).removeprefix('torch.')}, TP "
        f"{config.tensor_parallel_size}, block size {cache.block_size}, max_model_len "
        f"{limits.max_model_len}{', expert parallel' if config.enable_expert_parallel else ''}"
    )
    digest = int.from_bytes(hashlib.sha256(words.encode()).digest()[:8], "little") >> 2
    return digest, words


def check_same_model(group: ParallelGroup, config: EngineConfig) -> None:
    """Raise ValueError on every rank unless all ranks have the same serving digest."""
    digest, words = serving_digest(config)
    mine = torch.tensor([digest], dtype=torch.int64)
    everyone = group.all_gather_last_dim(mine).tolist()
    differing = [rank for rank, theirs in enumerate(everyone) if theirs != everyone[0]]
    if differing:
        raise ValueError(
            f"the DP ranks do not serve the same model: DP rank(s) "
            f"{', '.join(map(str, differing))} differ from DP rank 0 (DP rank {group.rank} "
            f"serves {words})"
        )


def spans_data_parallel(config: EngineConfig) -> bool:
    """Whether the model's MoE layers form one group over all DP ranks (then the ranks
    step in lockstep: DESIGN.md, "Parallelism inside an instance")."""
    return config.model.moe is not None and config.data_parallel.size > 1


def join_moe_group(config: EngineConfig, tp_rank: int, device: torch.device) -> ParallelGroup:
    """This rank's place in the MoE group of all ``DP x TP`` ranks (rank ``dp_rank * tp +
    tp_rank``), met at the DP group's store under its own prefix; NCCL on CUDA. Every
    rank of every DP rank calls it while loading its model."""
    dp, tp = config.data_parallel, config.tensor_parallel_size
    size = dp.size * tp
    store = dist.PrefixStore(
        "moe/",
        dist.TCPStore(dp.master_host, dp.master_port, is_master=False, timeout=JOIN_TIMEOUT),
    )
    address = GroupAddress(dp.master_host, dp.master_port, size)
    return join_group(address, dp.rank * tp + tp_rank, device, store)
