"""What the engine hands back: per-step engine-core outputs and per-request results."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class OutputKind(enum.Enum):
    """What a request's outputs carry: everything so far, only what is new since the
    last output (streaming), or a single output once the request has finished."""

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class Logprob:
    """Log-probability of one token under the model's (unprocessed) distribution."""

    logprob: float
    rank: int  # 1 = most likely token
    decoded_token: str | None = None


# One entry per generated token: the chosen token and the top-k alternatives.
TokenLogprobs = dict[int, Logprob]


@dataclass
class EngineCoreOutput:
    """What one engine step produced for one request (a diff: only new tokens)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request (cumulative)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one prompt, as ``LLM.generate`` returns it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
