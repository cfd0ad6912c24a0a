"""CPU serving under a shared load: pd-serve's thread policy vs one thread vs torch's default.

    python benchmarks/cpu_shared_load.py                 # ~30M-parameter model, CPU
    python benchmarks/cpu_shared_load.py --repeats 3 --settings policy omp1

For each setting this starts a real ``pd-serve`` on CPU (dummy weights of a ~30M-parameter
Llama shape, or ``--model``), warms it up, and drives it with ``pd-bench`` from this
machine, so the engine shares the cores with its API server and the load generator
(``--busy N`` adds N busy-looping processes: other work on the machine). It prints
output tokens/s and the mean inter-token latency (ITL: about one decode step of the
batch) per setting, medians over ``--repeats`` runs taken in interleaved order (ABBA; the
machine may be shared with other work: compare within one run), and the median ratio
of each run's tokens/s to the ``omp1`` run of the same repeat.

Settings (every one starts from this environment without OMP_*/GOMP_*/KMP_* variables):

- ``policy``: pd-serve's defaults (``pd.cpu_threads``);
- ``omp1``: ``OMP_NUM_THREADS=1``, the single-threaded reference;
- ``torch-default``: what pd-serve ran before the policy: a thread per core and libgomp's
  own wait (``GOMP_SPINCOUNT=300000``, its value when no wait policy is set);
- ``active``: a thread per core, ``OMP_WAIT_POLICY=ACTIVE`` (threads never sleep);
- ``passive``: a thread per core, the policy's passive wait.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.offline_throughput import write_dummy_model
from pd.cpu_threads import usable_cores
from tests.pd.server_process import ServerProcess, start_server

# A Llama shape of ~34M parameters (16M of them the tied embedding).
BENCH_MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "bos_token_id": 0,
    "eos_token_id": 1,
}
OPENMP_VARS = ("OMP_", "GOMP_", "KMP_")
ENGINE_THREADS_LINE = re.compile(r" engine (\d+) torch threads? \(")
BUSY_LOOP = "while True: pass"


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    env: dict[str, str]
    serve_args: tuple[str, ...] = ()


def settings(num_cores: int) -> list[Setting]:
    per_core = ("--engine-threads", str(num_cores))
    return [
        Setting("policy", "policy (default)", {}),
        Setting("omp1", "OMP_NUM_THREADS=1", {"OMP_NUM_THREADS": "1"}),
        Setting(
            "torch-default",
            f"torch default ({num_cores} thr, spin)",
            {"GOMP_SPINCOUNT": "300000"},
            per_core,
        ),
        Setting("active", f"{num_cores} thr, WAIT=ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"}, per_core),
        Setting("passive", f"{num_cores} thr, WAIT=PASSIVE", {}, per_core),
    ]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(OPENMP_VARS)}


def bench(
    args, server: ServerProcess, model_dir: Path, num_prompts: int, output_len: int, seed: int
) -> dict:
    """One pd-bench run against ``server``; its summary."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [
            sys.executable, "-m", "pd.bench", "--base-url", server.base_url,
            "--endpoint", "completions", "--tokenizer", str(model_dir),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(args.max_concurrency),
            "--input-len", str(args.input_len), "--output-len", str(output_len),
            "--seed", str(seed), "--result-json", str(result), "--no-progress",
        ]  # fmt: skip
        subprocess.run(command, env=clean_env(), check=True, capture_output=True, text=True)
        return json.loads(result.read_text())["summary"]


def run_one(args, setting: Setting, model_dir: Path, log: Path, seed: int) -> dict:
    serve_args = ["--max-model-len", "1024", "--max-num-seqs", str(args.max_concurrency)]
    if args.model is None:
        serve_args += ["--load-format", "dummy"]
    env = dict(clean_env(), **setting.env)
    server = start_server(model_dir, log, *serve_args, *setting.serve_args, env=env)
    try:
        bench(args, server, model_dir, 2, 8, seed + 1_000_003)  # warm-up
        summary = bench(args, server, model_dir, args.num_prompts, args.output_len, seed)
    finally:
        server.stop()
    found = ENGINE_THREADS_LINE.search(server.log())
    return {
        "threads": int(found[1]) if found else None,
        "tok_s": summary["output_throughput"],
        "itl_ms": summary["itl_ms"]["mean"],
        "tpot_ms": summary["tpot_ms"]["mean"],
        "failed": summary["num_failed"],
    }


def print_table(args, chosen: list[Setting], runs: dict[str, list[dict]], num_cores: int) -> None:
    print(
        f"\nmodel={args.model or '~34M llama (dummy)'} cores={num_cores} "
        f"prompts={args.num_prompts} x ({args.input_len} in, {args.output_len} out) "
        f"concurrency={args.max_concurrency} busy={args.busy} repeats={args.repeats} "
        "(medians; runs interleaved)"
    )
    reference = runs.get("omp1")
    header = (
        f"{'setting':<28}{'threads':>8}{'out tok/s':>11}{'ITL ms':>9}{'TPOT ms':>9}"
        f"{'vs OMP=1':>10}  tok/s per run"
    )
    print(header)
    print("-" * len(header))
    for setting in chosen:
        rows = runs[setting.key]
        tok_s = statistics.median(r["tok_s"] for r in rows)
        itl = statistics.median(r["itl_ms"] for r in rows)
        tpot = statistics.median(r["tpot_ms"] for r in rows)
        # NOTE: the ratio pairs each run with the OMP=1 run of the same repeat (minutes
        # apart), which cancels more of the other load on the machine than the medians.
        if reference:
            pairs = zip(rows, reference, strict=True)
            ratio = f"{statistics.median(r['tok_s'] / ref['tok_s'] for r, ref in pairs):.0%}"
        else:
            ratio = "-"
        per_run = " ".join(f"{r['tok_s']:.0f}" for r in rows)
        failed = sum(r["failed"] for r in rows)
        print(
            f"{setting.label:<28}{rows[0]['threads'] or '?':>8}{tok_s:>11.1f}{itl:>9.1f}"
            f"{tpot:>9.1f}{ratio:>10}  {per_run}" + (f"  ({failed} failed)" if failed else "")
        )


def main() -> None:
    num_cores = usable_cores()
    known = [s.key for s in settings(num_cores)]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local HF model folder (default: ~34M dummy llama)")
    parser.add_argument("--settings", nargs="+", choices=known, default=known[:3])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--busy", type=int, default=0, metavar="N", help="N busy-looping processes beside it"
    )
    args = parser.parse_args()
    chosen = [s for s in settings(num_cores) if s.key in args.settings]
    runs: dict[str, list[dict]] = {s.key: [] for s in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else write_dummy_model(
            Path(tmp) / "bench-34m", BENCH_MODEL
        )  # fmt: skip
        busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
        try:
            for repeat in range(args.repeats):
                # every other repeat in reverse, so no setting always runs first
                for setting in chosen if repeat % 2 == 0 else chosen[::-1]:
                    row = run_one(args, setting, model_dir, Path(tmp) / "server.log", args.seed)
                    runs[setting.key].append(row)
                    print(
                        f"run {repeat + 1}/{args.repeats} {setting.label}: "
                        f"{row['tok_s']:.1f} tok/s, ITL {row['itl_ms']:.1f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for process in busy:
                process.kill()
                process.wait()
    print_table(args, chosen, runs, num_cores)


if __name__ == "__main__":
    main()
