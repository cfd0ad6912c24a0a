"""The paged Triton attention kernels at Llama-3.1-8B heads (32 query / 8 KV heads,
head_dim 128, bf16, block size 16) next to references measured in the same run.

    python benchmarks/attention_bench.py            # the tables (under a minute on an H200)
    python benchmarks/attention_bench.py --sweep    # + tile configs and split counts (minutes)

Decode: batch {1, 32, 256} x context {1024, 4096}, every block scattered through a pool.
Calls are replayed from a CUDA graph (as the engine runs decode), each call on its own
block table over its own blocks, so that at least 256 MiB of KV rotate through L2 (as
between layers of a model, where no layer's KV is still cached). "KV GB/s" is the K and V
bytes read per second, next to the HBM rate of a >= 1 GiB device-to-device copy
((read + written) / time).

Prefill: one 4096-token prompt and 4 x 1024, causal (FLOPs counted for the lower triangle
only), next to torch SDPA's flash backend on contiguous q/k/v of the same shapes (K/V
expanded to the 32 query heads).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from itertools import product
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.roofline import copy_rate
from engine.kernels.paged_attention import (
    DecodeConfig,
    PrefillConfig,
    decode_config,
    decode_num_splits,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_config,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DECODE_BATCHES = (1, 32, 256)
DECODE_CONTEXTS = (1024, 4096)
PREFILL_SHAPES = ((1, 4096), (4, 1024))  # (prompts, tokens each)
L2_ROTATION_BYTES = 256 << 20
GB = 1e9
DEVICE = "cuda"


def time_per_call(fn: Callable[[], None], repeats: int = 10) -> float:
    """Seconds per call of ``fn`` after a warm-up, by CUDA events (median of repeats)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def graph_time_per_call(calls: list[Callable[[], None]]) -> float:
    """Seconds per call when ``calls`` are replayed back to back from one CUDA graph."""
    for call in calls[:2]:
        call()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return time_per_call(graph.replay) / len(calls)


def make_pool(num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V caches (the engine's layout, [2, blocks, ...]), random bf16."""
    kv = torch.empty((2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), dtype=DTYPE,
                     device=DEVICE).normal_()  # fmt: skip
    return kv[0], kv[1]


def decode_calls(
    k_cache: torch.Tensor, v_cache: torch.Tensor, batch_size: int, context_len: int,
    num_splits: int, config: DecodeConfig | None,
) -> list[Callable[[], None]]:  # fmt: skip
    """One call per block table; the tables take disjoint blocks in a random order."""
    blocks_per_call = batch_size * context_len // BLOCK_SIZE
    kv_bytes = 2 * blocks_per_call * k_cache[0].numel() * k_cache.element_size()
    num_tables = min(k_cache.shape[0] // blocks_per_call,
                     max(1, math.ceil(L2_ROTATION_BYTES / kv_bytes)))  # fmt: skip
    order = torch.randperm(k_cache.shape[0], device=DEVICE, dtype=torch.int32)
    seq_lens = torch.full((batch_size,), context_len, dtype=torch.int32, device=DEVICE)
    q = torch.randn((batch_size, NUM_HEADS, HEAD_DIM), dtype=DTYPE, device=DEVICE)
    out = torch.empty_like(q)
    calls = []
    for i in range(max(num_tables, 8)):
        table_index = i % num_tables
        blocks = order[table_index * blocks_per_call : (table_index + 1) * blocks_per_call]
        block_table = blocks.view(batch_size, -1)
        calls.append(
            lambda table=block_table: paged_decode_attention(
                q, k_cache, v_cache, out, seq_lens, table, HEAD_DIM**-0.5, num_splits, config
            )
        )
    return calls


def decode_kv_bytes(batch_size: int, context_len: int) -> int:
    return 2 * batch_size * context_len * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize


def decode_table(k_cache: torch.Tensor, v_cache: torch.Tensor, hbm: float, num_sms: int) -> None:
    print(f"\ndecode, {decode_config(DTYPE, HEAD_DIM, k_cache.device)}")
    print(f"{'batch':>6} {'context':>8} {'splits':>6} {'us/call':>9} {'KV GB/s':>9} {'of HBM':>7}")
    for batch_size in DECODE_BATCHES:
        for context_len in DECODE_CONTEXTS:
            splits = decode_num_splits(batch_size, context_len, num_sms, NUM_KV_HEADS)
            calls = decode_calls(k_cache, v_cache, batch_size, context_len, splits, None)
            seconds = graph_time_per_call(calls)
            rate = decode_kv_bytes(batch_size, context_len) / seconds
            print(f"{batch_size:>6} {context_len:>8} {splits:>6} {seconds * 1e6:>9.1f} "
                  f"{rate / GB:>9.0f} {rate / hbm:>7.0%}")  # fmt: skip


def prefill_inputs(
    k_cache: torch.Tensor, v_cache: torch.Tensor, num_prompts: int, prompt_len: int
) -> tuple[torch.Tensor, ...]:
    """q [T, Hq, D], query_start_loc, seq_lens, block_table for whole prompts (no prefix),
    and contiguous q/k/v [B, Hq, L, D] of the same tokens for SDPA."""
    blocks_per_prompt = prompt_len // BLOCK_SIZE
    order = torch.randperm(k_cache.shape[0], device=DEVICE, dtype=torch.int32)
    block_table = order[: num_prompts * blocks_per_prompt].view(num_prompts, -1)
    q = torch.randn((num_prompts * prompt_len, NUM_HEADS, HEAD_DIM), dtype=DTYPE, device=DEVICE)
    query_start_loc = torch.arange(0, num_prompts + 1, dtype=torch.int32, device=DEVICE)
    query_start_loc *= prompt_len
    seq_lens = torch.full((num_prompts,), prompt_len, dtype=torch.int32, device=DEVICE)
    group = NUM_HEADS // NUM_KV_HEADS

    def dense(cache: torch.Tensor) -> torch.Tensor:  # [B, L, Hk, D] -> [B, Hq, L, D]
        tokens = cache[block_table.long()].view(num_prompts, prompt_len, NUM_KV_HEADS, -1)
        return tokens.repeat_interleave(group, 2).transpose(1, 2).contiguous()

    dense_q = q.view(num_prompts, prompt_len, NUM_HEADS, -1).transpose(1, 2).contiguous()
    return (q, query_start_loc, seq_lens, block_table,
            dense_q, dense(k_cache), dense(v_cache))  # fmt: skip


def prefill_seconds(
    k_cache: torch.Tensor, v_cache: torch.Tensor, inputs: tuple[torch.Tensor, ...],
    prompt_len: int, config: PrefillConfig | None,
) -> float:  # fmt: skip
    q, query_start_loc, seq_lens, block_table = inputs[:4]
    out = torch.empty_like(q)
    return time_per_call(
        lambda: paged_prefill_attention(q, k_cache, v_cache, out, query_start_loc, seq_lens,
                                        block_table, HEAD_DIM**-0.5, prompt_len, config)
    )  # fmt: skip


def sdpa_seconds(inputs: tuple[torch.Tensor, ...]) -> float:
    q, k, v = inputs[4:]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return time_per_call(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        )


def causal_flops(num_prompts: int, prompt_len: int) -> float:
    return 4 * num_prompts * prompt_len * prompt_len / 2 * NUM_HEADS * HEAD_DIM


def prefill_table(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    print(f"\nprefill (causal), {prefill_config(DTYPE, HEAD_DIM, k_cache.device)}")
    print(f"{'prompts':>8} {'tokens':>7} {'ms':>7} {'TFLOP/s':>8} {'SDPA ms':>8} "
          f"{'SDPA TFLOP/s':>13} {'vs SDPA':>8}")  # fmt: skip
    for num_prompts, prompt_len in PREFILL_SHAPES:
        inputs = prefill_inputs(k_cache, v_cache, num_prompts, prompt_len)
        ours = prefill_seconds(k_cache, v_cache, inputs, prompt_len, None)
        sdpa = sdpa_seconds(inputs)
        flops = causal_flops(num_prompts, prompt_len)
        print(f"{num_prompts:>8} {prompt_len:>7} {ours * 1e3:>7.3f} {flops / ours / 1e12:>8.0f} "
              f"{sdpa * 1e3:>8.3f} {flops / sdpa / 1e12:>13.0f} {sdpa / ours:>8.0%}")  # fmt: skip


def sweep(k_cache: torch.Tensor, v_cache: torch.Tensor, num_sms: int) -> None:
    """Tile configs and split counts around the defaults; 'n/a' where a config does not
    fit (shared memory, registers)."""
    shapes = [(1, 4096), (32, 4096), (256, 4096)]
    print("\nsweep: decode us/call at the default splits; config = block_n, warps, stages")
    print(f"{'config':>14} " + " ".join(f"{f'B={b},{c}':>11}" for b, c in shapes))
    for block_n, num_warps, num_stages in product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
        config = DecodeConfig(block_n, num_warps, num_stages)
        cells = []
        for batch_size, context_len in shapes:
            splits = decode_num_splits(batch_size, context_len, num_sms, NUM_KV_HEADS)
            calls = decode_calls(k_cache, v_cache, batch_size, context_len, splits, config)
            cells.append(_sweep_cell(lambda calls=calls: graph_time_per_call(calls) * 1e6))
        print(f"{f'{block_n},{num_warps},{num_stages}':>14} " + " ".join(cells))

    split_counts = (1, 2, 4, 8, 16, 32)
    print("\nsweep: decode us/call by split count, default config")
    print(f"{'B,context':>14} " + " ".join(f"{n:>11}" for n in split_counts))
    for batch_size, context_len in [(1, 1024), (1, 4096), (32, 1024), (32, 4096)]:
        cells = []
        for splits in split_counts:
            calls = decode_calls(k_cache, v_cache, batch_size, context_len, splits, None)
            cells.append(_sweep_cell(lambda calls=calls: graph_time_per_call(calls) * 1e6))
        print(f"{f'{batch_size},{context_len}':>14} " + " ".join(cells))

    print("\nsweep: prefill of one 4096-token prompt, TFLOP/s; config = block_m, block_n, "
          "warps, stages")  # fmt: skip
    inputs = prefill_inputs(k_cache, v_cache, 1, 4096)
    tflop = causal_flops(1, 4096) / 1e12
    for tiles in product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        config = PrefillConfig(*tiles)
        cell = _sweep_cell(
            lambda config=config: tflop / prefill_seconds(k_cache, v_cache, inputs, 4096, config)
        )
        print(f"{','.join(map(str, tiles)):>14} {cell}")


def _sweep_cell(measure: Callable[[], float]) -> str:
    try:
        return f"{measure():>11.1f}"
    except (triton.runtime.errors.OutOfResources, RuntimeError):
        return f"{'n/a':>11}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep tile configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_bench needs CUDA")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}")  # fmt: skip
    hbm = copy_rate(1 << 30)  # the roofline benchmark's reference: reads + writes
    print(f"HBM (1 GiB device-to-device copy, read + write): {hbm / GB:.0f} GB/s")
    num_blocks = max(DECODE_BATCHES) * max(DECODE_CONTEXTS) // BLOCK_SIZE
    k_cache, v_cache = make_pool(num_blocks)
    decode_table(k_cache, v_cache, hbm, props.multi_processor_count)
    prefill_table(k_cache, v_cache)
    if args.sweep:
        sweep(k_cache, v_cache, props.multi_processor_count)


if __name__ == "__main__":
    main()
