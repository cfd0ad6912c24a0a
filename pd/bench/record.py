"""What one benchmark request measured: the unit every statistic is computed from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestRecord:
    """One request's outcome; times in seconds.

    ``start_s`` is when it was sent, counted from the start of the run. ``ttft_s``
    is the time to the first chunk that carried output, ``itl_s`` the gaps between
    later output chunks (a chunk may hold more than one token), ``latency_s`` the
    time to the end of the stream. A failed request keeps what it measured before
    it failed, but statistics use only successful ones.
    """

    index: int
    is_success: bool
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    start_s: float = 0.0
    ttft_s: float | None = None
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None with fewer than two tokens."""
        if self.ttft_s is None or self.latency_s is None or self.num_output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.num_output_tokens - 1)

    @classmethod
    def failed(cls, index: int, error: str, start_s: float = 0.0) -> RequestRecord:
        return cls(index=index, is_success=False, error=error, start_s=start_s)
