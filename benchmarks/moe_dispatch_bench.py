"""What moving tokens to their experts and back costs per MoE layer when the MoE group
spans DP ranks, on CPU (gloo, as the engine runs it), next to the experts' own compute.

    python benchmarks/moe_dispatch_bench.py --ranks 2 --tokens 16 256

Each rank is a process with its own tokens and 1/N of the experts (expert parallel) or
1/N of every expert (split). Per layer forward (median of the iterations, rank 0): the
whole layer, the experts' compute inside it, and their difference, the dispatch and
combine (counts, rows out, rows back); then the same layer for one rank's tokens on one
process holding every expert, the no-communication reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lockstep_bench import run_ranks

HIDDEN, EXPERTS, TOP_K, INTERMEDIATE = 1024, 64, 8, 256  # a Qwen3-MoE-like layer, scaled down


def make_layer(group, expert_parallel: bool, tp):  # type: ignore[no-untyped-def]
    import torch

    from engine.layers.fused_moe import FusedMoE

    torch.manual_seed(0)
    layer = FusedMoE(EXPERTS, HIDDEN, INTERMEDIATE, group, expert_parallel, tp)
    layer.w13_weight.data.normal_(0, HIDDEN**-0.5)
    layer.w2_weight.data.normal_(0, INTERMEDIATE**-0.5)
    return layer


def routing(num_tokens: int, seed: int):  # type: ignore[no-untyped-def]
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=generator)
    logits = torch.randn(num_tokens, EXPERTS, generator=generator)
    weights, ids = torch.topk(logits.softmax(-1), TOP_K)
    return hidden, weights, ids


def timed_layer(layer, hidden, weights, ids, iterations: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Median seconds of the layer's forward, and of the experts' compute within it."""
    compute: list[float] = []
    local_experts = layer.local_experts

    def counted(*args):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        out = local_experts(*args)
        compute.append(time.perf_counter() - started)
        return out

    layer.local_experts = counted  # instrumentation: time the experts inside the layer
    totals = []
    for _ in range(iterations):
        compute.clear()
        started = time.perf_counter()
        layer(hidden, weights, ids)
        totals.append((time.perf_counter() - started, sum(compute)))
    layer.local_experts = local_experts
    return statistics.median(t for t, _ in totals), statistics.median(c for _, c in totals)


def rank_main(rank: int, size: int, port: int, args, results) -> None:  # type: ignore[no-untyped-def]
    import torch
    import torch.distributed as dist

    from engine.distributed import JOIN_TIMEOUT, GroupAddress, ParallelGroup, join_group

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=JOIN_TIMEOUT)
    group = join_group(GroupAddress("127.0.0.1", port, size), rank, torch.device("cpu"), store)
    rows = []
    with torch.inference_mode():
        for expert_parallel in (True, False):
            layer = make_layer(group, expert_parallel, ParallelGroup.single())
            single = make_layer(ParallelGroup.single(), expert_parallel, None)
            for num_tokens in args.tokens:
                hidden, weights, ids = routing(num_tokens, seed=rank)
                layer(hidden, weights, ids)  # warm-up
                total, compute = timed_layer(layer, hidden, weights, ids, args.iterations)
                alone, _ = timed_layer(single, hidden, weights, ids, args.iterations)
                rows.append((expert_parallel, num_tokens, total, compute, alone))
    if rank == 0:
        results.put(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    rows = run_ranks(rank_main, args.ranks, args, timeout_s=600)
    print(f"MoE layer: hidden {HIDDEN}, {EXPERTS} experts, top-{TOP_K}, width "
          f"{INTERMEDIATE}, float32, {args.ranks} DP ranks (gloo), 1 thread each")  # fmt: skip
    print("| layout | tokens per rank | layer ms | experts ms | dispatch + combine ms | "
          "one rank, all experts ms |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for expert_parallel, num_tokens, total, compute, alone in rows:
        layout = "expert parallel (all_to_all)" if expert_parallel else "split (gather/scatter)"
        print(f"| {layout} | {num_tokens} | {total * 1e3:.2f} | {compute * 1e3:.2f} | "
              f"{(total - compute) * 1e3:.2f} | {alone * 1e3:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
