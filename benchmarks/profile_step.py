"""Where a step's GPU time goes: torch.profiler around ``LLM.generate``.

    python benchmarks/profile_step.py --preset llama-8b            # batch-1 decode and a batch step
    python benchmarks/profile_step.py --preset llama-8b --batch 256

Prints, per workload, the kernels ranked by total CUDA time (with launch counts),
the kernel launches per generated token, and the wall time per token next to the
summed kernel time (their gap is host overhead: Python, launches, syncs). Only the
public ``LLM`` API is used, so the same script profiles any version of the engine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_roofline import LLAMA_8B, fixed_len_prompts
from benchmarks.offline_throughput import LLAMA_1B, write_dummy_model
from pd import LLM, SamplingParams

PRESETS = {"llama-8b": LLAMA_8B, "llama-1b": LLAMA_1B}


def profile_generate(llm: LLM, prompts: list[list[int]], max_tokens: int, top: int) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests, params)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        llm.generate(requests, params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total_us = sum(e.device_time_total for e in events)
    launches = sum(e.count for e in events)
    steps = max_tokens  # one prefill step, then max_tokens - 1 decode steps
    print(
        f"\n{len(prompts)} x ({len(prompts[0])} in, {max_tokens} out): wall {wall * 1e3:.1f} ms, "
        f"kernels {total_us / 1e3:.1f} ms ({100 * total_us / 1e6 / wall:.0f}% of wall), "
        f"{launches / steps:.0f} kernel launches per step"
    )
    print("| kernel | calls | total ms | share |\n|---|---:|---:|---:|")
    for e in events[:top]:
        name = e.key if len(e.key) < 70 else e.key[:67] + "..."
        share = 100 * e.device_time_total / total_us
        print(f"| {name} | {e.count} | {e.device_time_total / 1e3:.2f} | {share:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-8b")
    parser.add_argument("--batch", type=int, default=64, help="requests of the batch workload")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--engine-args", default="", help="k=v,... passed to LLM (e.g. enforce_eager=1)"
    )
    args = parser.parse_args()
    config = PRESETS[args.preset]
    extra = dict(kv.split("=") for kv in args.engine_args.split(",") if kv)
    options = {k: (v == "1") if k == "enforce_eager" else v for k, v in extra.items()}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_dummy_model(Path(tmp) / args.preset, config)
        llm = LLM(
            model=str(model_dir), dtype="bfloat16", device="cuda", load_format="dummy",
            max_model_len=4608, enable_prefix_caching=False, **options,
        )  # fmt: skip
        vocab = config["vocab_size"]
        profile_generate(llm, fixed_len_prompts(1, 128, vocab, 0), args.decode_tokens, args.top)
        batch = fixed_len_prompts(args.batch, 512, vocab, 1)
        profile_generate(llm, batch, args.decode_tokens, args.top)


if __name__ == "__main__":
    main()
