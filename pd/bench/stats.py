"""Pure statistics over request records: percentiles, SLO checks, goodput, the summary.

Times come in as seconds (``RequestRecord``) and leave as milliseconds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from pd.bench.record import RequestRecord

MAX_ERROR_KINDS = 5


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between the closest
    ranks, as numpy's default method; ``values`` need not be sorted."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles of one latency, in milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values_s: Sequence[float]) -> Distribution | None:
        """None when there is nothing to describe (every request failed, say)."""
        if not values_s:
            return None
        values_ms = [value * 1000.0 for value in values_s]
        return cls(
            mean=math.fsum(values_ms) / len(values_ms),
            p50=percentile(values_ms, 50),
            p90=percentile(values_ms, 90),
            p99=percentile(values_ms, 99),
        )


@dataclass(frozen=True)
class Slo:
    """Service-level objectives a request must meet to count towards goodput."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def describe(self) -> str:
        parts = [f"TTFT <= {self.ttft_ms:g} ms"] if self.ttft_ms is not None else []
        parts += [f"TPOT <= {self.tpot_ms:g} ms"] if self.tpot_ms is not None else []
        return ", ".join(parts)


def meets_slo(record: RequestRecord, slo: Slo) -> bool:
    """A successful request within every given objective. A request of one output
    token has no TPOT, so it meets any TPOT objective."""
    if not record.is_success or record.ttft_s is None:
        return False
    if slo.ttft_ms is not None and record.ttft_s * 1000.0 > slo.ttft_ms:
        return False
    tpot_s = record.tpot_s
    return slo.tpot_ms is None or tpot_s is None or tpot_s * 1000.0 <= slo.tpot_ms


def per_second(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0


@dataclass(frozen=True)
class Summary:
    """The whole run: counts, throughputs (per second of ``duration_s``), latencies."""

    num_success: int
    num_failed: int
    duration_s: float
    num_input_tokens: int
    num_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    itl_ms: Distribution | None
    e2e_ms: Distribution | None
    errors: dict[str, int]  # the most common error messages and their counts
    slo: Slo | None = None
    num_good: int | None = None
    goodput: float | None = None  # requests per second that met the SLO


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slo: Slo | None = None
) -> Summary:
    done = [r for r in records if r.is_success]
    num_input_tokens = sum(r.num_prompt_tokens for r in done)
    num_output_tokens = sum(r.num_output_tokens for r in done)
    errors = Counter(r.error or "unknown error" for r in records if not r.is_success)
    num_good = None if slo is None else sum(meets_slo(r, slo) for r in done)
    return Summary(
        num_success=len(done),
        num_failed=len(records) - len(done),
        duration_s=duration_s,
        num_input_tokens=num_input_tokens,
        num_output_tokens=num_output_tokens,
        request_throughput=per_second(len(done), duration_s),
        input_throughput=per_second(num_input_tokens, duration_s),
        output_throughput=per_second(num_output_tokens, duration_s),
        ttft_ms=Distribution.of_seconds([r.ttft_s for r in done if r.ttft_s is not None]),
        tpot_ms=Distribution.of_seconds([r.tpot_s for r in done if r.tpot_s is not None]),
        itl_ms=Distribution.of_seconds([gap for r in done for gap in r.itl_s]),
        e2e_ms=Distribution.of_seconds([r.latency_s for r in done if r.latency_s is not None]),
        errors=dict(errors.most_common(MAX_ERROR_KINDS)),
        slo=slo,
        num_good=num_good,
        goodput=None if num_good is None else per_second(num_good, duration_s),
    )
