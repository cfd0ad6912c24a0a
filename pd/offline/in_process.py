"""The offline backend of one DP rank: its ``EngineCore`` in this process, stepped by the
caller (with tensor parallelism, the core starts the rank's worker processes)."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.outputs import EngineCoreOutput
from engine.sampling_params import SamplingParams


class InProcessBackend:
    def __init__(self, config: EngineConfig):
        self.config = config
        # With DP size > 1 (rank r of ranks run elsewhere) this joins the DP group first.
        self.engine = EngineCore(config)
        self.rank_name = f"dp{config.data_parallel.rank}"
        self.requests_per_rank = {self.rank_name: 0}

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        self.engine.validate_prompt(prompt_token_ids)

    def add(
        self, child_ids: list[str], prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        for index, child_id in enumerate(child_ids):
            self.engine.add_request(child_id, prompt_token_ids, params.for_child(index))
            self.requests_per_rank[self.rank_name] += 1

    def outputs(self) -> list[EngineCoreOutput]:
        if self.engine.lockstep and not self.engine.should_step():
            return []
        return self.engine.step()

    def abort(self, child_ids: list[str]) -> None:
        self.engine.abort_requests(child_ids)

    def settle(self) -> None:
        self.engine.wait_in_flight()  # rows of requests that ended while it ran
        # Lockstep DP (MoE over DP ranks run elsewhere): ours are done, but the other
        # ranks' steps need this rank's dummy forwards until every rank is done.
        while self.engine.lockstep and self.engine.should_step():
            self.engine.step()

    def close(self) -> None:
        self.engine.close()
