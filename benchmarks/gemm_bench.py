"""Batch-1 decode GEMMs of Llama-3.1-8B (bf16, M = 1) under cuBLAS settings that may
spare the split-K reduce kernel cuBLAS launches after some skinny GEMMs.

    python benchmarks/gemm_bench.py                 # every setting, each in a fresh process
    python benchmarks/gemm_bench.py --setting lt    # one

Per setting and weight: us per F.linear replayed from a CUDA graph (weights rotate
through more than L2 holds, as between layers), the weight bytes read per second, and
the kernels one call launches (torch.profiler), so a ``splitKreduce`` shows up. The last
line sums one decode step: 32 layers x (qkv, o, gate_up, down) + lm_head.

Settings (each needs a fresh process: cuBLAS handles read them once):
- default: what the engine runs.
- lt: TORCH_BLAS_PREFER_CUBLASLT=1 (cuBLASLt's heuristics, which may reduce in-kernel).
- no-workspace: CUBLAS_WORKSPACE_CONFIG=:0:1 and CUBLASLT_WORKSPACE_SIZE=0, so no
  algorithm that needs a reduction workspace can be chosen.
- fp32-reduction: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction off.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

HIDDEN, INTERMEDIATE, VOCAB, NUM_LAYERS = 4096, 14336, 128256, 32
# name -> (in features, out features)
WEIGHTS = {
    "qkv": (HIDDEN, 6144),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (HIDDEN, 2 * INTERMEDIATE),
    "down": (INTERMEDIATE, HIDDEN),
    "lm_head": (HIDDEN, VOCAB),
}
L2_ROTATION_BYTES = 512 << 20
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "lt": {"TORCH_BLAS_PREFER_CUBLASLT": "1"},
    "no-workspace": {"CUBLAS_WORKSPACE_CONFIG": ":0:1", "CUBLASLT_WORKSPACE_SIZE": "0"},
    "fp32-reduction": {},
}


def graph_seconds(calls: list[Callable[[], None]], repeats: int = 20) -> float:
    """Seconds per call when ``calls`` replay back to back from one CUDA graph (median)."""
    for call in calls:
        call()  # picks algorithms outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def kernels_of(call: Callable[[], None]) -> list[str]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


def run_setting(name: str) -> None:
    if name == "fp32-reduction":
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    step_seconds = 0.0
    print(f"\n{name}: {SETTINGS[name] or ''}")
    print(f"{'weight':>8} {'us/call':>8} {'GB/s':>6}  kernels")
    for weight_name, (size_in, size_out) in WEIGHTS.items():
        seconds, names = time_linear(size_in, size_out)
        step_seconds += seconds * (1 if weight_name == "lm_head" else NUM_LAYERS)
        rate = size_in * size_out * 2 / seconds / 1e9
        short = ", ".join(n if len(n) < 60 else n[:57] + "..." for n in names)
        print(f"{weight_name:>8} {seconds * 1e6:>8.1f} {rate:>6.0f}  {short}")
    print(f"one decode step's GEMMs: {step_seconds * 1e3:.3f} ms")


def time_linear(size_in: int, size_out: int) -> tuple[float, list[str]]:
    """Seconds per M = 1 F.linear, and the kernels one call launches."""
    copies = max(1, -(-L2_ROTATION_BYTES // (size_in * size_out * 2)))
    weights = [
        torch.randn((size_out, size_in), dtype=torch.bfloat16, device="cuda") for _ in range(copies)
    ]
    x = torch.randn((1, size_in), dtype=torch.bfloat16, device="cuda")
    calls = [lambda w=w: F.linear(x, w) for w in weights]
    calls = calls * max(1, 8 // len(calls))
    return graph_seconds(calls), kernels_of(calls[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemm_bench needs CUDA")
    if args.setting:
        run_setting(args.setting)
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, env in SETTINGS.items():
        subprocess.run(
            [sys.executable, __file__, "--setting", name],
            env={**os.environ, **env},
            check=False,
        )


if __name__ == "__main__":
    main()
