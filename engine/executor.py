"""Runs step plans on a DP rank's workers.

With tensor parallelism 1 the one worker lives in the engine-core process
(``InProcessExecutor``); with more, rank 0 stays here and the others run in
processes of their own that take the same plans (``engine.tp_executor``).

A worker extension adds a job to every rank without the engine knowing it (the
serving layer's KV transfer: each TP rank sends or receives its own KV shard).
``load_extension("package.module:Factory", *args)`` builds ``Factory(worker, notify,
*args)`` on every rank; ``call_extension(method, *args)`` calls a method on every
rank, in order with the steps, and returns each rank's answer (rank 0 first), or at
once from any thread with ``ordered=False`` (for thread-safe methods);
``notify(payload)`` lets an extension tell rank 0 something at any time (handled by
``on_notify``, on some thread). Arguments, answers and payloads are msgpack-able.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from engine.config import EngineConfig
from engine.distributed import ParallelGroup
from engine.kv_cache import KVCacheLayout
from engine.model_runner import KVAllocator
from engine.step_plan import StepPlan, StepResult
from engine.worker import PendingStep, Worker


def make_executor(config: EngineConfig, allocate_kv: KVAllocator):  # type: ignore[no-untyped-def]
    if config.tensor_parallel_size == 1:
        return InProcessExecutor(config, allocate_kv)
    from engine.tp_executor import TPExecutor

    return TPExecutor(config, allocate_kv)


Notify = Callable[[Any], None]


def build_extension(name: str, worker: Worker, notify: Notify, args: list) -> Any:
    """``Factory(worker, notify, *args)`` for ``name`` = "package.module:Factory"."""
    module_name, _, attribute = name.partition(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    return factory(worker, notify, *args)


class InProcessExecutor:
    def __init__(self, config: EngineConfig, allocate_kv: KVAllocator):
        self.worker = Worker(config, ParallelGroup.single(), allocate_kv)
        self.extension: Any = None
        self.on_notify: Notify = lambda payload: None

    @property
    def tp_size(self) -> int:
        return 1

    def load_extension(self, name: str, *args: Any) -> None:
        self.extension = build_extension(name, self.worker, self._notify, list(args))

    def call_extension(self, method: str, *args: Any, ordered: bool = True) -> list:
        return [getattr(self.extension, method)(*args)]

    def _notify(self, payload: Any) -> None:
        self.on_notify(payload)

    def submit(self, plan: StepPlan) -> PendingStep:
        """Queue a step on the device; ``result`` waits for it."""
        return self.worker.submit(plan)

    def result(self, step: PendingStep) -> StepResult:
        return self.worker.result(step)

    @property
    def kv_layout(self) -> KVCacheLayout:
        return self.worker.runner.layout

    @property
    def kv_cache(self) -> torch.Tensor:
        """Rank 0's KV pool."""
        return self.worker.runner.kv_cache

    def workers_alive(self) -> list[bool]:
        return [True]  # the one worker is this process

    def close(self) -> None:
        if self.extension is not None:
            self.extension.close()
