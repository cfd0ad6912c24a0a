"""Batch-1 decode projections (M = 1, bf16) of Llama-3.1-8B: cuBLAS (F.linear) against
our Triton GEMV (engine/kernels/gemv.py), next to the HBM copy rate of the same run.

    python benchmarks/gemv_bench.py            # the default config
    python benchmarks/gemv_bench.py --sweep    # every config; the best per weight and overall

Each call is replayed from a CUDA graph with the weights rotating through more bytes
than L2 holds, as between layers. The last lines sum one decode step's projections:
32 layers x (qkv, o, gate_up, down) + lm_head.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gemm_bench import L2_ROTATION_BYTES, NUM_LAYERS, WEIGHTS, graph_seconds
from benchmarks.roofline import copy_rate
from engine.kernels.gemv import GemvConfig, config_for, gemv


def weights_for(size_in: int, size_out: int) -> list[torch.Tensor]:
    copies = max(1, -(-L2_ROTATION_BYTES // (size_in * size_out * 2)))
    return [
        torch.randn((size_out, size_in), dtype=torch.bfloat16, device="cuda") / size_in**0.5
        for _ in range(copies)
    ]


def time_calls(weights: list[torch.Tensor], x: torch.Tensor, config: GemvConfig | None) -> float:
    if config is None:
        calls = [lambda w=w: F.linear(x, w) for w in weights]
    else:
        calls = [lambda w=w: gemv(x, w, config=config) for w in weights]
    return graph_seconds(calls * max(1, 8 // len(calls)))


def check(weights: list[torch.Tensor], x: torch.Tensor, config: GemvConfig) -> float:
    """The largest difference to a float32 reference, relative to its largest value."""
    reference = F.linear(x.float(), weights[0].float())
    got = gemv(x, weights[0], config=config).float()
    return float((got - reference).abs().max() / reference.abs().max())


SWEEP = [
    GemvConfig(block_n, block_k, warps, stages)
    for block_n, block_k, warps, stages in itertools.product(
        (4, 8, 16, 32), (256, 512, 1024), (4, 8), (2, 3, 4)
    )
    if block_n * block_k <= 16384
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemv_bench needs CUDA")
    torch.manual_seed(0)
    rate = copy_rate(1 << 30)  # the roofline benchmark's reference: reads + writes
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {_triton()}")
    print(f"HBM copy rate: {rate / 1e12:.2f} TB/s\n")
    configs = SWEEP if args.sweep else []
    chosen = "chosen"  # config_for(rows), as the engine picks
    totals = {None: 0.0, chosen: 0.0, **{c: 0.0 for c in configs}}
    bound = 0.0
    print("| weight | bytes | copy-rate bound us | cuBLAS us (TB/s) | GEMV as chosen | "
          "best GEMV, config | rel. err |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|---:|")
    for name, (size_in, size_out) in WEIGHTS.items():
        weights = weights_for(size_in, size_out)
        x = torch.randn((1, size_in), dtype=torch.bfloat16, device="cuda")
        count = 1 if name == "lm_head" else NUM_LAYERS
        nbytes = size_in * size_out * 2
        bound += count * nbytes / rate
        seconds = {
            config: time_calls(weights, x, config_for(size_out) if config == chosen else config)
            for config in totals
        }
        for config, value in seconds.items():
            totals[config] += count * value
        best = min([chosen, *configs], key=lambda c: seconds[c])
        best_config = config_for(size_out) if best == chosen else best
        error = check(weights, x, best_config)
        print(
            f"| {name} | {nbytes / 1e6:.0f} MB | {nbytes / rate * 1e6:.1f} | "
            f"{_us_rate(seconds[None], nbytes)} | {_us_rate(seconds[chosen], nbytes)} | "
            f"{_us_rate(seconds[best], nbytes)} {_short(best_config)} | {error:.1e} |"
        )
        del weights
    print(f"\none decode step's projections: bound {bound * 1e3:.3f} ms, cuBLAS "
          f"{totals[None] * 1e3:.3f} ms, GEMV as chosen {totals[chosen] * 1e3:.3f} ms")  # fmt: skip
    if configs:
        best_overall = min(configs, key=lambda c: totals[c])
        print(f"one config for all: {_short(best_overall)}, {totals[best_overall] * 1e3:.3f} ms")


def _us_rate(seconds: float, nbytes: int) -> str:
    return f"{seconds * 1e6:.1f} ({nbytes / seconds / 1e12:.2f})"


def _short(config: GemvConfig) -> str:
    return f"n{config.block_n} k{config.block_k} w{config.num_warps} s{config.num_stages}"


def _triton() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
