"""1P1D disaggregated vs 2 mixed instances, at the same load, as one markdown table.

    python benchmarks/pd_compare.py                       # tiny generated model, CPU
    python benchmarks/pd_compare.py --request-rate 1 2 3  # one row pair per rate

For every request rate and every setup, this starts a fresh local cluster with
``python -m pd.serve cluster`` (one at a time, so the two never share the machine),
waits for its OpenAI base URL, sends a few warm-up requests, runs ``python -m pd.bench``
with the same seeded prompts and Poisson arrivals, and stops the cluster with SIGTERM.
The rows come from each run's ``--result-json``. Flags this script does not know go
to every instance (default: ``--max-model-len 1024 --device cpu --dtype float32``).

Both setups have two instances, so they hold the same hardware: the question is
whether splitting prefill from decode keeps long prompts from stalling the tokens
of requests already decoding, which shows in the TPOT and ITL tails.

NOTE: on CPU, ``pd-serve cluster`` divides the cores among its instances' engines
(``--engine-threads``, unless ``OMP_NUM_THREADS`` is set: the clusters inherit this
script's environment). A prefill engine is mostly idle while the decode engine
works on its share alone; run with ``OMP_NUM_THREADS=1`` as well before crediting
the split.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERVE_ARGS = ("--max-model-len", "1024", "--device", "cpu", "--dtype", "float32")
BASE_URL_LINE = re.compile(r"OpenAI base URL: (\S+)")
READY_TIMEOUT_S = 600.0
# NOTE: longer than the launcher's own 40 s drain of its instances, so that it
# stops them itself; killing it would orphan them (they run in their own sessions).
STOP_TIMEOUT_S = 90.0
WARMUP_SEED = 1_000_003  # far from --seed: no shared prefixes with measured prompts


@dataclass(frozen=True)
class Setup:
    name: str
    cluster_args: tuple[str, ...]


SETUPS = (
    Setup("1P1D", ("--prefill", "1", "--decode", "1")),
    Setup("2 mixed", ("--prefill", "0", "--decode", "0", "--mixed", "2")),
)


@dataclass(frozen=True)
class Load:
    """One pd-bench run's workload; the same for every setup."""

    num_prompts: int
    request_rate: float
    input_len: int
    input_len_range: float
    output_len: int
    max_concurrency: int | None
    slo_ttft_ms: float
    slo_tpot_ms: float
    seed: int

    def bench_args(self) -> list[str]:
        args = [
            "--num-prompts", str(self.num_prompts), "--request-rate", str(self.request_rate),
            "--input-len", str(self.input_len), "--input-len-range", str(self.input_len_range),
            "--output-len", str(self.output_len), "--seed", str(self.seed),
            "--slo-ttft-ms", str(self.slo_ttft_ms), "--slo-tpot-ms", str(self.slo_tpot_ms),
        ]  # fmt: skip
        if self.max_concurrency is not None:
            args += ["--max-concurrency", str(self.max_concurrency)]
        return args


class Cluster:
    """A running ``pd.serve cluster``; a context manager that always stops it."""

    def __init__(self, setup: Setup, model: str | None, serve_args: list[str], run_dir: Path):
        command = [sys.executable, "-m", "pd.serve", "cluster", *setup.cluster_args]
        command += ["--port", "0", "--log-dir", str(run_dir / "logs")]
        command += ["--model", model or "tiny"]
        command += serve_args
        self.command = command
        self.log_path = run_dir / "cluster.out"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Cluster:
        print(f"$ {shlex.join(self.command)}", flush=True)
        with self.log_path.open("w") as log:
            # NOTE: a session of its own, so that Ctrl-C reaches only this script,
            # which then stops the cluster in __exit__ like any other error.
            self.process = subprocess.Popen(
                self.command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"cluster did not stop in {STOP_TIMEOUT_S:.0f} s; killing it", file=sys.stderr)
            self.process.kill()
            self.process.wait()
        if self.process.returncode != 0:
            print(
                f"cluster exited with {self.process.returncode}; see {self.log_path}",
                file=sys.stderr,
            )

    def wait_base_url(self) -> str:
        assert self.process is not None, "use Cluster as a context manager"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            match = BASE_URL_LINE.search(self.log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the cluster exited with {self.process.returncode}:\n{self.tail()}"
                )
            time.sleep(0.2)
        raise RuntimeError(
            f"the cluster was not ready after {READY_TIMEOUT_S:.0f} s:\n{self.tail()}"
        )

    def tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]


def served_model_folder(base_url: str) -> str | None:
    """The served model id when it names a local folder (its tokenizer makes exact-length
    token-id prompts), else None."""
    with urllib.request.urlopen(f"{base_url}/models", timeout=30) as reply:
        model_id = json.load(reply)["data"][0]["id"]
    return model_id if Path(model_id).is_dir() else None


def run_bench(base_url: str, bench_args: list[str], output_path: Path) -> None:
    """One pd-bench run; its printed table goes to ``output_path``."""
    command = [sys.executable, "-m", "pd.bench", "--base-url", base_url, "--no-progress"]
    command += bench_args
    with output_path.open("w") as output:
        code = subprocess.run(
            command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT
        ).returncode
    if code != 0:
        raise RuntimeError(f"pd-bench exited with {code}:\n{output_path.read_text()[-3000:]}")


def measure(
    setup: Setup, load: Load, args: argparse.Namespace, serve_args: list[str], run_dir: Path
) -> dict[str, Any]:
    """Start the setup's cluster, warm it up, run the load, stop it; the result JSON."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with Cluster(setup, args.model, serve_args, run_dir) as cluster:
        return run_load(cluster.wait_base_url(), load, args.num_warmup, run_dir, setup.name)


def run_load(
    base_url: str, load: Load, num_warmup: int, run_dir: Path, name: str
) -> dict[str, Any]:
    """``num_warmup`` requests, then ``load``, against ``base_url``; the result JSON."""
    result_path = run_dir / "result.json"
    tokenizer = served_model_folder(base_url)
    common = ["--tokenizer", tokenizer] if tokenizer else []
    if num_warmup:
        warmup = [*common, "--num-prompts", str(num_warmup), "--seed", str(WARMUP_SEED)]
        warmup += ["--input-len", str(load.input_len), "--output-len", str(load.output_len)]
        run_bench(base_url, warmup, run_dir / "warmup.txt")
    bench_args = [*common, *load.bench_args(), "--result-json", str(result_path)]
    print(f"  {name}: {load.num_prompts} prompts at {load.request_rate:g}/s", flush=True)
    run_bench(base_url, bench_args, run_dir / "bench.txt")
    return json.loads(result_path.read_text())


def table_row(setup: Setup, load: Load, result: dict[str, Any]) -> str:
    summary = result["summary"]

    def latency(name: str, percentile: str) -> str:
        distribution = summary[name]
        return "-" if distribution is None else f"{distribution[percentile]:.0f}"

    def pair(name: str) -> str:
        return f"{latency(name, 'p50')} / {latency(name, 'p99')}"

    num_requests = summary["num_success"] + summary["num_failed"]
    cells = [
        setup.name,
        f"{load.request_rate:g}",
        f"{summary['num_success']}/{num_requests}",
        f"{summary['request_throughput']:.2f}",
        f"{summary['output_throughput']:.1f}",
        pair("ttft_ms"),
        pair("tpot_ms"),
        latency("itl_ms", "p99"),
        f"{summary['goodput']:.2f} ({summary['num_good']})",
    ]
    return "| " + " | ".join(cells) + " |"


def table_header(load: Load) -> list[str]:
    goodput = f"goodput req/s (# with TTFT<={load.slo_ttft_ms:g}, TPOT<={load.slo_tpot_ms:g} ms)"
    columns = [
        "setup", "rate req/s", "completed", "req/s", "output tok/s", "TTFT p50 / p99 ms",
        "TPOT p50 / p99 ms", "ITL p99 ms", goodput,
    ]  # fmt: skip
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other flags go to every pd-serve instance "
        f"(default: {' '.join(DEFAULT_SERVE_ARGS)}).",
    )
    add = parser.add_argument
    add("--model", help="HF checkpoint folder or .gguf file (default: a tiny generated model)")
    add("--num-prompts", type=int, default=200)
    add("--request-rate", type=float, nargs="+", default=[2.0], help="one or more, req/s")
    add("--input-len", type=int, default=256)
    add("--input-len-range", type=float, default=0.5, help="F: lengths in L*(1 +- F)")
    add("--output-len", type=int, default=64)
    add("--max-concurrency", type=int, help="(default: no limit)")
    add("--slo-ttft-ms", type=float, default=1000.0, help="goodput's TTFT objective")
    add("--slo-tpot-ms", type=float, default=50.0, help="goodput's TPOT objective")
    add("--seed", type=int, default=0)
    add("--num-warmup", type=int, default=4, help="requests before each measured run")
    add("--out-dir", type=Path, help="logs, pd-bench outputs, results (default: a temp dir)")
    return parser


def main() -> int:
    args, serve_args = build_parser().parse_known_args()
    # SIGTERM as an exception too, so that the running cluster is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda number, _frame: sys.exit(128 + number))
    if not all(rate > 0 for rate in args.request_rate):
        sys.exit("pd_compare: --request-rate values must be positive")
    if args.num_warmup < 0:
        sys.exit("pd_compare: --num-warmup must be >= 0")
    serve_args = serve_args or list(DEFAULT_SERVE_ARGS)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="pd-compare-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"results in {out_dir}", flush=True)
    lines: list[str] = []
    for rate in args.request_rate:
        load = Load(
            num_prompts=args.num_prompts, request_rate=rate, input_len=args.input_len,
            input_len_range=args.input_len_range, output_len=args.output_len,
            max_concurrency=args.max_concurrency, slo_ttft_ms=args.slo_ttft_ms,
            slo_tpot_ms=args.slo_tpot_ms, seed=args.seed,
        )  # fmt: skip
        lines = lines or table_header(load)
        for setup in SETUPS:
            run_dir = out_dir / f"rate{rate:g}-{setup.name.replace(' ', '-')}"
            lines.append(table_row(setup, load, measure(setup, load, args, serve_args, run_dir)))
    caption = f"{args.num_prompts} prompts, Poisson arrivals, {load_caption(args, serve_args)}"
    table = "\n".join([caption, "", *lines])
    (out_dir / "table.md").write_text(table + "\n")
    print("\n" + table)
    return 0


def load_caption(args: argparse.Namespace, serve_args: list[str]) -> str:
    """The load and the instances, as a table's caption says them."""
    low, high = (args.input_len * (1 + sign * args.input_len_range) for sign in (-1, 1))
    return (
        f"input {low:.0f}-{high:.0f} tokens, output {args.output_len}, max concurrency "
        f"{args.max_concurrency or 'none'}, model {args.model or 'tiny llama'}, instance "
        f"flags: {' '.join(serve_args)}"
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the cluster has been stopped on the way out
        sys.exit("pd_compare: interrupted")
