"""The contract between the offline ``LLM`` and what runs its engine requests, and the
choice of backend from the ``LLM``'s options."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from engine.config import DataParallelConfig, EngineConfig, make_engine_config
from engine.outputs import EngineCoreOutput
from engine.sampling_params import SamplingParams
from pd.offline.options import DataParallelPlacement
from scheduler.config import SchedulerConfig

logger = logging.getLogger("pd.llm")


class Backend(Protocol):
    """Runs engine requests (a user request's ``n`` choices are ``n`` of them).

    The ``LLM`` checks every prompt (``check_prompt``) before it adds any, adds all of a
    generate call's requests, then reads ``outputs`` until its output processor has
    every request finished; on any error it aborts what it added, then ``settle``s.
    """

    config: EngineConfig  # the engine config of the first DP rank it runs
    # Engine requests each DP rank has taken so far, by rank name ("dp0", ... here; a
    # cluster's rank ids with splitwise, which may name other instances' ranks).
    requests_per_rank: dict[str, int]

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError when no rank can serve the prompt."""

    def add(
        self, child_ids: list[str], prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Queue the choices of one request (``params.for_child(i)`` each), all on one DP
        rank where the backend places them (they share the prompt's KV there)."""

    def outputs(self) -> list[EngineCoreOutput]:
        """The next output diffs (blocks until there are some, or one engine step ran);
        raises when a request is refused or a rank died."""

    def abort(self, child_ids: list[str]) -> None:
        """Stop these engine requests (finished ones are ignored)."""

    def settle(self) -> None:
        """After a generate call: nothing of it stays in flight here."""

    def close(self) -> None:
        """Stop everything the backend started; idempotent."""


def start_backend(
    engine_options: dict[str, Any],
    placement: DataParallelPlacement,
    scheduler: SchedulerConfig,
    queue_ports: list[int],
) -> Backend:
    """The backend for these options, started (models loaded); ``engine_options`` are
    ``make_engine_config``'s keywords (plain values), the same for every DP rank."""
    master_port = placement.master_port()
    rank_kwargs = {
        dp_rank: placement.engine_kwargs(engine_options, dp_rank, master_port)
        for dp_rank in placement.ranks
    }
    configs = {r: engine_config(kwargs) for r, kwargs in rank_kwargs.items()}  # checked first
    if scheduler.name == "splitwise":
        from pd.offline.splitwise import SplitwiseBackend

        return SplitwiseBackend(rank_kwargs, queue_ports, configs, scheduler)
    if placement.runs_in_process:
        from pd.offline.in_process import InProcessBackend

        if any(queue_ports):
            logger.info("engine_worker_queue_port is unused: the engine runs in this process")
        return InProcessBackend(configs[placement.ranks[0]])
    from pd.offline.data_parallel import DataParallelBackend

    return DataParallelBackend(rank_kwargs, queue_ports, configs)


def engine_config(kwargs: dict[str, Any]) -> EngineConfig:
    """One rank's config from its plain keywords (as its engine process builds it)."""
    data_parallel = DataParallelConfig(**kwargs["data_parallel"])
    return make_engine_config(**{**kwargs, "data_parallel": data_parallel})
