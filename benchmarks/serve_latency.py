"""Latency of one streamed request through pd-serve vs the same request in-process.

    python benchmarks/serve_latency.py            # tiny generated model, CPU

Starts a real ``pd-serve``, streams ``--runs`` greedy completions one at a
time with the official openai client, and reports time to first token (TTFT),
inter-token latency and decode tokens/s. The reference, measured in the same
run, is the offline ``LLM`` on the same model and prompt: its TTFT is a
``max_tokens=1`` generate, its decode rate the rest of a full generate. The
difference is what the API server, ZMQ hop and detokenizing stream cost.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai

from pd import LLM, SamplingParams
from scripts.make_tiny_model import make_tiny_model
from tests.pd.server_process import start_server

PROMPT = "Prefill and decode run on separate pools so that long prompts never stall streaming."


def measure_server(model_dir: Path, log: Path, runs: int, max_tokens: int) -> list[dict]:
    server = start_server(model_dir, log, "--max-model-len", "1024")
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        model = client.models.list().data[0].id
        results = []
        for _ in range(runs + 1):  # the first run warms up
            start = time.perf_counter()
            stamps = []
            stream = client.completions.create(
                model=model,
                prompt=PROMPT,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    stamps.append(time.perf_counter())
            results.append(_summary(start, stamps, max_tokens))
        return results[1:]
    finally:
        server.stop()


def measure_offline(model_dir: Path, runs: int, max_tokens: int) -> list[dict]:
    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", max_model_len=1024)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(PROMPT, full)  # warm-up
    results = []
    for _ in range(runs):
        start = time.perf_counter()
        llm.generate(PROMPT, first)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate(PROMPT, full)
        total = time.perf_counter() - start
        decode = max(total - ttft, 1e-9)
        results.append(
            {"ttft": ttft, "itl": decode / (max_tokens - 1), "tok_s": max_tokens / total}
        )
    return results


def _summary(start: float, stamps: list[float], max_tokens: int) -> dict:
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "ttft": stamps[0] - start,
        "itl": statistics.median(gaps) if gaps else 0.0,
        "tok_s": max_tokens / (stamps[-1] - start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local HF model folder (default: a tiny one)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_tiny_model(Path(tmp) / "tiny")
        served = measure_server(model_dir, Path(tmp) / "server.log", args.runs, args.max_tokens)
        offline = measure_offline(model_dir, args.runs, args.max_tokens)
    print(
        f"\nmodel={args.model or 'tiny llama'} device=cpu max_tokens={args.max_tokens} "
        f"runs={args.runs} (medians)"
    )
    header = f"{'path':<28}{'TTFT ms':>10}{'ITL ms':>10}{'tokens/s':>10}"
    print(header)
    print("-" * len(header))
    for name, rows in (("pd-serve stream (openai)", served), ("offline LLM (reference)", offline)):
        ttft = statistics.median(r["ttft"] for r in rows) * 1e3
        itl = statistics.median(r["itl"] for r in rows) * 1e3
        tok_s = statistics.median(r["tok_s"] for r in rows)
        print(f"{name:<28}{ttft:>10.1f}{itl:>10.2f}{tok_s:>10.1f}")


if __name__ == "__main__":
    main()
