"""The run as a printed table and as a JSON document (config, summary, records)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from pd.bench.config import BenchConfig
from pd.bench.record import RequestRecord
from pd.bench.stats import Distribution, Summary

WIDTH = 56
LATENCY_ROWS = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))


def format_table(config: BenchConfig, model: str, summary: Summary) -> str:
    rows: list[tuple[str, Any]] = [
        ("Model", model),
        ("Endpoint", config.endpoint),
        ("Successful requests", summary.num_success),
        ("Failed requests", summary.num_failed),
        ("Duration (s)", f"{summary.duration_s:.2f}"),
        ("Request throughput (req/s)", f"{summary.request_throughput:.2f}"),
        ("Input tokens", summary.num_input_tokens),
        ("Output tokens", summary.num_output_tokens),
        ("Input throughput (tok/s)", f"{summary.input_throughput:.2f}"),
        ("Output throughput (tok/s)", f"{summary.output_throughput:.2f}"),
    ]
    if summary.slo is not None and summary.goodput is not None:
        rows.append(("Goodput (req/s)", f"{summary.goodput:.2f}"))
        rows.append(("  meeting " + summary.slo.describe(), summary.num_good))
    lines = [" pd-bench ".center(WIDTH, "=")]
    lines += [_row(name, value) for name, value in rows]
    lines.append("-" * WIDTH)
    lines.append(f"{'Latency (ms)':<16}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, attribute in LATENCY_ROWS:
        lines.append(_latency_row(name, getattr(summary, attribute)))
    if summary.errors:
        lines.append("-" * WIDTH)
        lines += [f"{count:>5} x {message}" for message, count in summary.errors.items()]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _row(name: str, value: Any) -> str:
    label, text = name + ":", str(value)
    return f"{label:<{max(WIDTH - len(text) - 1, len(label))}} {text}"


def _latency_row(name: str, distribution: Distribution | None) -> str:
    if distribution is None:
        return f"{name:<16}" + f"{'-':>10}" * 4
    values = (distribution.mean, distribution.p50, distribution.p90, distribution.p99)
    return f"{name:<16}" + "".join(f"{value:>10.2f}" for value in values)


def result_document(
    config: BenchConfig, model: str, summary: Summary, records: list[RequestRecord]
) -> dict[str, Any]:
    """Everything the run knows, as JSON-ready values (inf as the string "inf")."""
    settings = dataclasses.asdict(config)
    if config.api_key:
        settings["api_key"] = "<redacted>"
    requests = [dict(dataclasses.asdict(r), tpot_s=r.tpot_s) for r in records]
    document = {"model": model, "config": settings, "summary": summary, "requests": requests}
    return _jsonable(document)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
