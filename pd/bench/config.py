"""``pd-bench``'s flags and the frozen ``BenchConfig`` they become.

Values are checked here, at the edge: a bad flag exits with status 2 and one line
on stderr (``pd-bench: error: ...``), before any request is sent.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pd.bench.stats import Slo

# Endpoint name -> path under the base URL.
ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}
DEFAULT_REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    num_prompts: int
    input_len: int
    output_len: int
    model: str | None = None  # None: the first model the server lists
    endpoint: str = "completions"
    request_rate: float = math.inf  # requests per second, Poisson arrivals
    max_concurrency: int | None = None
    input_len_range: float = 0.0
    output_len_range: float = 0.0
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    result_json: Path | None = None
    api_key: str | None = None
    tokenizer: Path | None = None  # None: the model id, when it is a local folder
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://: {self.base_url!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}")
        for flag, value in (
            ("--num-prompts", self.num_prompts),
            ("--input-len", self.input_len),
            ("--output-len", self.output_len),
            ("--max-concurrency", self.max_concurrency),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        for flag, value in (
            ("--input-len-range", self.input_len_range),
            ("--output-len-range", self.output_len_range),
        ):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{flag} must be in [0, 1), got {value}")
        for flag, value in (
            ("--request-rate", self.request_rate),
            ("--request-timeout", self.request_timeout_s),
            ("--slo-ttft-ms", self.slo_ttft_ms),
            ("--slo-tpot-ms", self.slo_tpot_ms),
        ):
            if value is not None and not value > 0:  # NOTE: also refuses NaN
                raise ValueError(f"{flag} must be positive, got {value}")
        if math.isinf(self.request_timeout_s):
            raise ValueError("--request-timeout must be finite")

    @property
    def endpoint_url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINTS[self.endpoint]

    @property
    def slo(self) -> Slo | None:
        if self.slo_ttft_ms is None and self.slo_tpot_ms is None:
            return None
        return Slo(ttft_ms=self.slo_ttft_ms, tpot_ms=self.slo_tpot_ms)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pd-bench",
        description="Load-test an OpenAI-compatible server with seeded random prompts "
        "and report throughput, TTFT, TPOT, ITL, end-to-end latency and goodput.",
    )
    add = parser.add_argument
    add("--base-url", required=True, help="the API root, e.g. http://127.0.0.1:8000/v1")
    add("--model", help="model name to request (default: the first id of GET /v1/models)")
    add("--endpoint", choices=list(ENDPOINTS), default="completions")
    add("--num-prompts", type=int, required=True, help="number of requests to send")
    add(
        "--request-rate",
        type=float,
        default=math.inf,
        help="mean requests per second, Poisson arrivals (default: inf, all at once)",
    )
    add("--max-concurrency", type=int, help="most requests in flight at once (default: no limit)")
    add("--input-len", type=int, required=True, help="prompt length in tokens")
    add(
        "--input-len-range",
        type=float,
        default=0.0,
        help="F: prompt lengths uniform in [L*(1-F), L*(1+F)] (default 0)",
    )
    add("--output-len", type=int, required=True, help="output tokens per request (max_tokens)")
    add("--output-len-range", type=float, default=0.0, help="F, as --input-len-range")
    add("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    add("--slo-ttft-ms", type=float, help="TTFT objective for goodput")
    add("--slo-tpot-ms", type=float, help="TPOT objective for goodput")
    add("--result-json", type=Path, help="write config, summary and per-request records here")
    add("--api-key", help="sent as 'Authorization: Bearer KEY'")
    add(
        "--tokenizer",
        type=Path,
        help="local folder (or tokenizer.json) of the served model's tokenizer, for prompts "
        "of exact token lengths (default: the model id, when it names a local folder)",
    )
    add(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="seconds before a request counts as failed (default %(default)g)",
    )
    add("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> BenchConfig:
    """Parse and check the flags; on a bad one, exit 2 with the reason."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return BenchConfig(
            base_url=args.base_url,
            num_prompts=args.num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            model=args.model,
            endpoint=args.endpoint,
            request_rate=args.request_rate,
            max_concurrency=args.max_concurrency,
            input_len_range=args.input_len_range,
            output_len_range=args.output_len_range,
            seed=args.seed,
            slo_ttft_ms=args.slo_ttft_ms,
            slo_tpot_ms=args.slo_tpot_ms,
            result_json=args.result_json,
            api_key=args.api_key,
            tokenizer=args.tokenizer,
            request_timeout_s=args.request_timeout,
            show_progress=not args.no_progress,
        )
    except ValueError as error:
        parser.error(str(error))
