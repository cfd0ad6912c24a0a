"""Runs step plans on a DP rank's workers.

With tensor parallelism 1 the one worker lives in the engine-core process
(``InProcessExecutor``); with more, rank 0 stays here and the others run in
processes of their own that take the same plans (``engine.tp_executor``).
"""

from __future__ import annotations

import torch

from engine.config import EngineConfig
from engine.distributed import ParallelGroup
from engine.kv_cache import KVCacheLayout
from engine.model_runner import KVAllocator
from engine.step_plan import StepPlan, StepResult
from engine.worker import KVSender, PendingStep, Worker


def make_executor(config: EngineConfig, allocate_kv: KVAllocator):  # type: ignore[no-untyped-def]
    if config.tensor_parallel_size == 1:
        return InProcessExecutor(config, allocate_kv)
    from engine.tp_executor import TPExecutor

    return TPExecutor(config, allocate_kv)


class InProcessExecutor:
    def __init__(self, config: EngineConfig, allocate_kv: KVAllocator):
        self.worker = Worker(config, ParallelGroup.single(), allocate_kv)

    def submit(self, plan: StepPlan) -> PendingStep:
        """Queue a step on the device; ``result`` waits for it."""
        return self.worker.submit(plan)

    def result(self, step: PendingStep) -> StepResult:
        return self.worker.result(step)

    def set_kv_sender(self, sender: KVSender | None) -> None:
        self.worker.kv_sender = sender

    @property
    def kv_layout(self) -> KVCacheLayout:
        return self.worker.runner.layout

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.worker.runner.kv_cache

    def workers_alive(self) -> list[bool]:
        return [True]  # the one worker is this process

    def close(self) -> None:
        pass
