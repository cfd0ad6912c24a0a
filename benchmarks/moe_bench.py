"""One MoE layer shaped as Qwen3-30B-A3B's (hidden 2048, 128 experts, top-8, expert width
768, bf16, dummy weights): the fused Triton grouped GEMM (engine/kernels/fused_moe.py)
against running the experts one by one in torch (``FusedMoE.forward_torch``, the HF
loop), next to the HBM copy rate of the same run.

    python benchmarks/moe_bench.py                     # batches 1, 16, 256, 2048
    python benchmarks/moe_bench.py --tokens 1 64 --experts 64 --top-k 6
    python benchmarks/moe_bench.py --sweep             # also the best tiles per batch

Weight bytes are those of the experts the batch picks (3 matrices each); bytes/s is
that over the time per call. Calls rotate over two copies of the layer and fresh
routings, so weights come from HBM rather than L2 (1.2 GB per copy). The fused path is
timed eagerly and replayed from a CUDA graph (as a decode step runs it); the loop reads
back which experts are hit, so it runs eagerly only. rel. err: the largest difference
to the loop's output, over the loop's largest value.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gemm_bench import graph_seconds
from benchmarks.roofline import copy_rate
from engine.distributed import ParallelGroup
from engine.kernels.fused_moe import MoeTileConfig, choose_config, fused_experts
from engine.layers.fused_moe import FusedMoE
from engine.weight_loader import init_dummy_weights

NUM_COPIES = 2  # layers rotated through: 2 x 1.2 GB, far past L2
NUM_ROUTINGS = 4


def make_layers(args: argparse.Namespace) -> list[FusedMoE]:
    layers = []
    for seed in range(NUM_COPIES):
        with torch.device("cuda"):
            layer = FusedMoE(args.experts, args.hidden, args.width, ParallelGroup.single(), False)
        layer = layer.to(torch.bfloat16)
        init_dummy_weights(layer, seed)  # as --load-format dummy: uniform(-0.02, 0.02)
        layers.append(layer)
    return layers


def routings(num_tokens: int, args: argparse.Namespace) -> list[tuple[torch.Tensor, ...]]:
    """(hidden, weights, ids) per call: softmax over random logits, top-k, renormalised."""
    out = []
    for _ in range(NUM_ROUTINGS):
        hidden = torch.randn(num_tokens, args.hidden, device="cuda", dtype=torch.bfloat16)
        probs = torch.softmax(torch.randn(num_tokens, args.experts, device="cuda"), dim=-1)
        weights, ids = probs.topk(args.top_k, dim=-1)
        out.append((hidden, weights / weights.sum(dim=-1, keepdim=True), ids))
    return out


def eager_seconds(calls: list[Callable[[], object]], repeats: int = 5) -> float:
    """Seconds per call when ``calls`` run back to back eagerly (median of ``repeats``)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


SWEEP = [
    MoeTileConfig(block_m, block_n, block_k, warps, stages)
    for block_m, block_n, block_k, warps, stages in itertools.product(
        (16, 32, 64), (32, 64, 128), (64, 128), (4, 8), (3, 4)
    )
]


def run_batch(num_tokens: int, layers: list[FusedMoE], args: argparse.Namespace) -> str:
    cases = [(layer, *routing) for layer in layers for routing in routings(num_tokens, args)]

    def fused(layer: FusedMoE, x, w, ids, tiles: MoeTileConfig | None = None):  # type: ignore[no-untyped-def]
        return fused_experts(
            x, layer.w13_weight, layer.w2_weight, w, ids, config=tiles, holds_all_experts=True
        )

    fused_calls = [lambda c=c: fused(*c) for c in cases]
    loop_calls = [lambda c=c: c[0].forward_torch(*c[1:]) for c in cases]
    fused_eager = eager_seconds(fused_calls)
    fused_graph = graph_seconds(fused_calls, repeats=10)
    loop = eager_seconds(loop_calls, repeats=3)
    hit = sum(int(torch.unique(c[3]).numel()) for c in cases) / len(cases)
    nbytes = hit * 3 * args.hidden * args.width * 2
    layer, x, w, ids = cases[0]
    expected = layer.forward_torch(x, w, ids).float()
    error = (fused(layer, x, w, ids).float() - expected).abs().max() / expected.abs().max()
    tiles = choose_config(num_tokens * args.top_k, args.experts)
    if args.sweep:
        swept = {}
        for c in SWEEP:
            try:  # NOTE: the warm-up calls compile, before any capture begins
                swept[c] = graph_seconds(
                    [lambda case=case, c=c: fused(*case, c) for case in cases], 5
                )
            except OutOfResources:  # too much shared memory for these tiles
                continue
        best = min(swept, key=swept.__getitem__)
        print(f"tokens {num_tokens}: best tiles m{best.block_m} n{best.block_n} "
              f"k{best.block_k} w{best.num_warps} s{best.num_stages} "
              f"{_us_rate(swept[best], nbytes)}", flush=True)  # fmt: skip
    return (
        f"| {num_tokens} | {hit:.0f} | {nbytes / 1e6:.0f} | {_us_rate(loop, nbytes)} | "
        f"{_us_rate(fused_eager, nbytes)} | {_us_rate(fused_graph, nbytes)} | "
        f"{loop / fused_eager:.1f}x | m{tiles.block_m} n{tiles.block_n} k{tiles.block_k} | "
        f"{error:.1e} |"
    )


def _us_rate(seconds: float, nbytes: float) -> str:
    return f"{seconds * 1e6:.0f} ({nbytes / seconds / 1e12:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 2048])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--width", type=int, default=768, help="each expert's intermediate size")
    parser.add_argument("--sweep", action="store_true", help="time every tile config too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("moe_bench needs CUDA")
    torch.manual_seed(0)
    rate = copy_rate(1 << 30)  # the roofline benchmark's reference: reads + writes
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"HBM copy rate: {rate / 1e12:.2f} TB/s")
    print(f"layer: hidden {args.hidden}, {args.experts} experts, top-{args.top_k}, expert "
          f"width {args.width}, bf16\n")  # fmt: skip
    print("| tokens | experts hit | weight MB | loop us (TB/s) | fused us (TB/s) | "
          "fused in a graph us (TB/s) | speed-up | tiles | rel. err |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    layers = make_layers(args)
    for num_tokens in args.tokens:
        print(run_batch(num_tokens, layers, args), flush=True)


if __name__ == "__main__":
    main()
