"""User-facing sampling parameters, validated when built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; names and defaults follow vLLM.

    Invalid values raise ``ValueError`` naming the field, so user input can be
    checked by simply constructing the object.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # Filled in by the engine from the tokenizer/generation config, not by users.
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n, low=1)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, low=0, high=_INT32_MAX, hint="use 0 or -1 to disable")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1, high=_UINT32_MAX)
        _check_int("min_tokens", self.min_tokens, low=0, high=_UINT32_MAX)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=20)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, low=0, high=_UINT32_MAX)

    def to_wire(self) -> dict:
        """The fields as a msgpack-able map: the one form in which sampling parameters
        cross processes (the API server's ADD, the TP workers' step plans)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_wire(cls, fields: dict) -> SamplingParams:
        """``to_wire``'s map, rebuilt and so validated again (ValueError or TypeError)."""
        return cls(**{**fields, "eos_token_ids": tuple(fields.get("eos_token_ids") or ())})

    def for_child(self, index: int) -> SamplingParams:
        """Params of the ``index``-th of ``n`` completions: one sample each, and a
        distinct seed so that seeded completions differ yet stay reproducible."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def reads_history(self) -> bool:
        """Whether sampling reads the tokens so far (penalties, min_tokens' stop mask)."""
        return self.has_penalties or self.min_tokens > 0

    @property
    def all_stop_token_ids(self) -> set[int]:
        """Token ids that end the request (eos unless ignored, plus stop_token_ids)."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(self.eos_token_ids)
        return ids


def _check_number(name: str, value: object, low: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value:  # NaN
        raise ValueError(f"{name} must be a number, got NaN")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


_INT64_MAX = 2**63 - 1
# What the cluster's records carry (proto/cluster.proto): a mixed instance holds the same
# limits, so a request valid on one kind of instance is valid on every kind.
_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1


def _check_int(
    name: str, value: object, low: int | None = None, high: int | None = None, hint: str = ""
) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not -_INT64_MAX <= value <= _INT64_MAX:  # it has to cross process boundaries
        raise ValueError(f"{name} must fit in 64 bits, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        suffix = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must be {bounds}, got {value}{suffix}")
