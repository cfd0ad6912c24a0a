"""One request's state inside the engine: tokens, progress, and its KV blocks."""

from __future__ import annotations

import enum

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PARKED = "parked"  # prefill done on a prefill rank; blocks held while its KV is sent
    FINISHED = "finished"


class Sequence:
    """Tokens split into computed (KV in cache) and not-yet-computed.

    ``num_computed_tokens <= num_tokens``: a step computes the next chunk;
    when the whole sequence is computed the model samples one more token.
    Prefill, chunked prefill, prefix-cache hits, decode and recompute after
    preemption are all this one rule.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival: int,
        prefill_only: bool = False,
    ):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival = arrival
        # A prefill rank's request: parked (not finished) once its first token is
        # sampled, so its blocks outlive the step until the KV hand-off is over.
        self.prefill_only = prefill_only
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        # Tokens sampled by steps still running on the device (async scheduling): their
        # positions are scheduled and computed, their values not known yet.
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of token_ids
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_ids}, {self.status.value})"
        )
