"""What pd-router adds to TTFT and ITL, as one markdown table.

    python benchmarks/router_overhead.py                     # tiny generated model, CPU
    python benchmarks/router_overhead.py --request-rate 4 --num-prompts 200 --repeats 2

Every run starts a fresh cluster with ``python -m pd.serve cluster`` (one at a time, so
that no two share the machine), sends warm-up requests, runs ``python -m pd.bench`` with
the same load (seeded prompts, Poisson arrivals, rate, number of requests) and stops the
cluster with SIGTERM (``benchmarks/pd_compare.py``'s helpers). The rows:

1. **mixed, direct**: ``pd-serve cluster --router --mixed 1``; pd-bench to the mixed
   instance's own URL (the launcher lists it).
2. **mixed, via pd-router**: the same command; pd-bench to the router's URL.
   Reference: row 1.
3. **1P1D, Redis**: ``pd-serve cluster`` (embedded Redis, the splitwise scheduler);
   pd-bench to the prefill instance.
4. **1P1D, via pd-router**: ``pd-serve cluster --router --prefill 1 --decode 1``
   (``pd-router --splitwise``); pd-bench to the router. Reference: row 3.

Each pair runs as A, B, A (``--repeats N``: N B runs between N + 1 A runs), so drift
shows as the gap between its A rows. A B row's "added" cells are its percentile minus
the mean of the A runs just before and after it.

NOTE: row 1 is served by the same command as row 2, so the same processes run (the
router idle but probing, the instance heartbeating to it) with the same thread split:
only the request path differs. Each run gets a cluster of its own rather than rows 1
and 2 sharing one, because the prompts are the same every run and the prefix cache
(on by default) would serve the later runs' prompts.

Caveats: row 4 against row 3 is the router's pairing against Redis's, not the proxy
hop alone (the pairing, the hand-off and the result path differ too). On CPU the
router, the instances' API servers and engines, and pd-bench share the cores (with 2
cores, heavily): the router's cost shows partly as CPU taken from the engines, which a
router on its own host would not take. With few requests p99 is close to the maximum.
Flags this script does not know go to every instance (default: ``--max-model-len 1024
--device cpu --dtype float32``).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pd_compare import (
    DEFAULT_SERVE_ARGS,
    Cluster,
    Load,
    Setup,
    load_caption,
    run_load,
)

SLO_TTFT_MS = 1000.0  # pd-bench wants objectives; this table does not show goodput
SLO_TPOT_MS = 50.0


@dataclass(frozen=True)
class Row:
    """One setup: the cluster command and where pd-bench sends the load."""

    name: str
    cluster_args: tuple[str, ...]
    target: str  # "router" (the launcher's base URL), or the role of a listed instance

    @property
    def setup(self) -> Setup:
        return Setup(self.name, self.cluster_args)


MIXED_ARGS = ("--router", "--mixed", "1")
PAIRS = {  # (reference, through the router)
    "mixed": (
        Row("mixed, direct", MIXED_ARGS, "mixed"),
        Row("mixed, via pd-router", MIXED_ARGS, "router"),
    ),
    "1p1d": (
        Row("1P1D, Redis", ("--prefill", "1", "--decode", "1"), "prefill"),
        Row("1P1D, via pd-router", ("--router", "--prefill", "1", "--decode", "1"), "router"),
    ),
}
LATENCIES = (("ttft_ms", "TTFT"), ("itl_ms", "ITL"))


@dataclass(frozen=True)
class Run:
    row: Row
    summary: dict[str, Any]

    def latency(self, name: str, percentile: str) -> float | None:
        distribution = self.summary[name]
        return None if distribution is None else distribution[percentile]


def listed_url(cluster: Cluster, role: str) -> str:
    """The URL the launcher lists for its first instance of ``role`` (once it is ready)."""
    match = re.search(rf"^ +{role} +(\S+)$", cluster.tail(num_chars=100_000), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"the launcher lists no {role} instance:\n{cluster.tail()}")
    return match.group(1)


def measure(
    row: Row, load: Load, args: argparse.Namespace, serve_args: list[str], run_dir: Path
) -> Run:
    run_dir.mkdir(parents=True, exist_ok=True)
    with Cluster(row.setup, args.model, serve_args, run_dir) as cluster:
        base_url = cluster.wait_base_url()
        url = base_url if row.target == "router" else listed_url(cluster, row.target)
        return Run(row, run_load(url, load, args.num_warmup, run_dir, row.name)["summary"])


def run_pair(
    pair: tuple[Row, Row],
    load: Load,
    args: argparse.Namespace,
    serve_args: list[str],
    out_dir: Path,
) -> list[Run]:
    """A, B, A, ..., A: ``args.repeats`` runs of the router row between reference runs."""
    reference, routed = pair
    order = [reference, *[row for _ in range(args.repeats) for row in (routed, reference)]]
    runs = []
    for number, row in enumerate(order, start=1):
        slug = re.sub(r"[^a-z0-9]+", "-", row.name.lower()).strip("-")
        runs.append(measure(row, load, args, serve_args, out_dir / f"{number}-{slug}"))
    return runs


def format_ms(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.1f}"


def added(run: Run, references: list[Run], name: str, percentile: str) -> str:
    """``run``'s percentile minus the mean of ``references``' ones."""
    value = run.latency(name, percentile)
    values = [v for r in references if (v := r.latency(name, percentile)) is not None]
    if value is None or len(values) < len(references):
        return "-"
    return format_ms(value - sum(values) / len(values), "+")


def table_lines(runs: list[Run]) -> list[str]:
    """One row per run; a router run's "added" cells against its neighbouring references."""
    columns = ["setup", "req/s"]
    columns += [f"{label} p50 / p99 ms" for _, label in LATENCIES]
    columns += [f"added {label} p50 / p99 ms" for _, label in LATENCIES]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for index, run in enumerate(runs):
        cells = [run.row.name, f"{run.summary['request_throughput']:.2f}"]
        cells += [
            f"{format_ms(run.latency(name, 'p50'))} / {format_ms(run.latency(name, 'p99'))}"
            for name, _ in LATENCIES
        ]
        if run.row.target == "router":  # a pair's runs start and end with a reference
            neighbours = [runs[index - 1], runs[index + 1]]
            cells += [
                f"{added(run, neighbours, name, 'p50')} / {added(run, neighbours, name, 'p99')}"
                for name, _ in LATENCIES
            ]
        else:
            cells += [""] * len(LATENCIES)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def failure_notes(runs: list[Run]) -> list[str]:
    notes = []
    for index, run in enumerate(runs):
        summary = run.summary
        if summary["num_failed"]:
            total = summary["num_success"] + summary["num_failed"]
            notes.append(
                f"run {index + 1} ({run.row.name}): {summary['num_failed']} of {total} "
                f"requests failed: {summary['errors']}"
            )
    return notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other flags go to every pd-serve instance "
        f"(default: {' '.join(DEFAULT_SERVE_ARGS)}).",
    )
    add = parser.add_argument
    add("--model", help="HF checkpoint folder or .gguf file (default: a tiny generated model)")
    add("--num-prompts", type=int, default=60)
    add("--request-rate", type=float, default=2.0, help="req/s, Poisson arrivals")
    add("--input-len", type=int, default=128)
    add("--input-len-range", type=float, default=0.5, help="F: lengths in L*(1 +- F)")
    add("--output-len", type=int, default=32)
    add("--max-concurrency", type=int, help="(default: no limit)")
    add("--seed", type=int, default=0)
    # NOTE: on a GPU the first requests of each new prompt shape compile kernels: with 4
    # warm-up requests, p99 TTFT of a run swung between 16 and 900 ms; with 48, not.
    add("--num-warmup", type=int, default=32, help="requests before each measured run")
    add("--repeats", type=int, default=1, help="router runs per pair, each between references")
    add("--pairs", nargs="+", choices=sorted(PAIRS), default=list(PAIRS), help="(default: both)")
    add("--out-dir", type=Path, help="logs, pd-bench outputs, results (default: a temp dir)")
    return parser


def main() -> int:
    args, serve_args = build_parser().parse_known_args()
    # SIGTERM as an exception too, so that the running cluster is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda number, _frame: sys.exit(128 + number))
    if args.request_rate <= 0 or args.num_prompts < 1:
        sys.exit("router_overhead: --request-rate must be > 0 and --num-prompts >= 1")
    if args.num_warmup < 0 or args.repeats < 1:
        sys.exit("router_overhead: --num-warmup must be >= 0 and --repeats >= 1")
    serve_args = serve_args or list(DEFAULT_SERVE_ARGS)
    load = Load(
        num_prompts=args.num_prompts, request_rate=args.request_rate, input_len=args.input_len,
        input_len_range=args.input_len_range, output_len=args.output_len,
        max_concurrency=args.max_concurrency, slo_ttft_ms=SLO_TTFT_MS, slo_tpot_ms=SLO_TPOT_MS,
        seed=args.seed,
    )  # fmt: skip
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="pd-router-overhead-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"results in {out_dir}", flush=True)
    runs: list[Run] = []
    for pair in args.pairs:
        runs += run_pair(PAIRS[pair], load, args, serve_args, out_dir / pair)
    caption = (
        f"{args.num_prompts} prompts at {args.request_rate:g} req/s (Poisson), "
        f"{load_caption(args, serve_args)}. Runs in the order shown, each on a fresh "
        "cluster; added: minus the mean of the reference runs before and after."
    )
    notes = failure_notes(runs)
    table = "\n".join([caption, "", *table_lines(runs), *(["", *notes] if notes else [])])
    (out_dir / "table.md").write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the cluster has been stopped on the way out
        sys.exit("router_overhead: interrupted")
