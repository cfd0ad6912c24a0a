"""pd's ``LLM.generate`` against the GPU's roofline and HF ``transformers``.

    python benchmarks/gpu_roofline.py                          # Llama-3.1-8B and 3.2-1B shapes
    python benchmarks/gpu_roofline.py --preset llama-8b --long-context --json out.json
    python benchmarks/gpu_roofline.py --preset tiny --device cpu   # smoke check, no bounds

Models are config-only folders with dummy (random) weights in bf16, so nothing is
downloaded. Each row prints pd's time, a lower bound on it (benchmarks/roofline.py:
FLOPs at the matmul rate, bytes at the HBM bandwidth, both measured in the same run),
the share bound / pd time, and HF ``transformers`` ``generate`` on the same shape.
Batch-1 decode is (t(max_tokens=257) - t(max_tokens=1)) / 256 for both, and its
bound the same difference of bounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.offline_throughput import LLAMA_1B, _hf_generate, best_of, write_dummy_model
from benchmarks.roofline import (
    ModelShape,
    References,
    generate_bound,
    measure_references,
    shape_from_config,
    shape_from_model,
)
from engine.cublas_settings import prefer_single_kernel_gemms
from pd import LLM, SamplingParams
from scripts.make_tiny_model import make_tiny_model

LLAMA_8B = {
    **LLAMA_1B,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rope_scaling": {**LLAMA_1B["rope_scaling"], "factor": 8.0},
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Workload:
    """Request sizes of the measures; ``tiny`` shrinks them for a CPU smoke check."""

    decode_prompt_len: int = 128
    decode_len: int = 256
    batch_num: int = 256
    batch_prompt_len: int = 512
    batch_output_len: int = 128
    ttft_prompt_len: int = 4096
    long_num: int = 256
    long_prompt_len: int = 4000
    long_output_len: int = 32


PRESETS: dict[str, tuple[dict | None, Workload]] = {
    "llama-8b": (LLAMA_8B, Workload()),
    "llama-1b": (LLAMA_1B, Workload()),
    "tiny": (None, Workload(16, 32, 8, 64, 16, 256, 8, 200, 8)),
}


@dataclass
class Measure:
    """One table row; times in seconds. ``hf`` is a string when HF has no time
    ("skipped", "OOM")."""

    label: str
    unit: str  # "s", "ms" or "ms/token": how the row prints
    pd: float | None = None
    bound: float | None = None
    hf: float | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def fixed_len_prompts(num: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Seeded random token ids, every prompt exactly ``prompt_len`` long."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(prompt_len)] for _ in range(num)]


# (prompts, max_tokens, repeats) -> seconds of the fastest generate; pd and HF each have one.
Timer = Callable[[list[list[int]], int, int], float]


def new_measures(w: Workload, long_context: bool) -> dict[str, Measure]:
    measures = {
        "startup": Measure("start-up (LLM() / HF model built)", "s"),
        "decode": Measure(f"batch-1 decode, {w.decode_prompt_len}-token prompt", "ms/token"),
        "ttft": Measure(f"TTFT, {w.ttft_prompt_len}-token prompt", "ms"),
        "batch": Measure(
            f"{w.batch_num} x ({w.batch_prompt_len} in, {w.batch_output_len} out)", "s"
        ),
    }
    if long_context:
        label = f"{w.long_num} x ({w.long_prompt_len} in, {w.long_output_len} out)"
        measures["long"] = Measure(label, "s", hf="—")
    return measures


def set_bounds(
    measures: dict[str, Measure], shape: ModelShape, refs: References, work: Workload
) -> None:
    n, prompt = work.decode_len, [work.decode_prompt_len]
    decode = _difference(
        generate_bound(shape, refs, prompt, n + 1), generate_bound(shape, refs, prompt, 1)
    )
    measures["decode"].bound = None if decode is None else decode / n
    measures["ttft"].bound = generate_bound(shape, refs, [work.ttft_prompt_len], 1)
    batch = [work.batch_prompt_len] * work.batch_num
    measures["batch"].bound = generate_bound(shape, refs, batch, work.batch_output_len)
    if "long" in measures:
        long = [work.long_prompt_len] * work.long_num
        measures["long"].bound = generate_bound(shape, refs, long, work.long_output_len)


def time_decode(timer: Timer, args, work: Workload, vocab: int) -> float:
    """Seconds per decoded token: (t(N + 1 tokens) - t(1 token)) / N."""
    prompts = fixed_len_prompts(1, work.decode_prompt_len, vocab, args.seed)
    timer(prompts, 8, 1)  # warm-up
    one = timer(prompts, 1, 3 * args.repeats)
    full = timer(prompts, work.decode_len + 1, args.repeats)
    return (full - one) / work.decode_len


def time_ttft(timer: Timer, args, work: Workload, vocab: int) -> float:
    prompts = fixed_len_prompts(1, work.ttft_prompt_len, vocab, args.seed + 1)
    timer(prompts, 1, 1)  # warm-up
    return timer(prompts, 1, 3 * args.repeats)


def time_batch(timer: Timer, args, work: Workload, vocab: int) -> float:
    prompts = fixed_len_prompts(work.batch_num, work.batch_prompt_len, vocab, args.seed + 2)
    # Warm-up: the whole batch, a few tokens each, so the Triton kernels of its mixed
    # prefill + decode steps are compiled (a cold cache added ~1.4 s to the timed run,
    # the variance earlier runs showed); a serving engine runs warm.
    timer(prompts, 8, 1)
    return timer(prompts, work.batch_output_len, 1)


def _best_of(args: argparse.Namespace, run: Callable[[], object], repeats: int) -> float:
    """offline_throughput.best_of with its own repeat count."""
    return best_of(argparse.Namespace(repeats=repeats, device=args.device), run)


def pd_timer(args: argparse.Namespace, llm: LLM) -> Timer:
    def timer(prompts: list[list[int]], max_tokens: int, repeats: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        requests = [{"prompt_token_ids": p} for p in prompts]

        def once() -> None:
            outputs = llm.generate(requests, params)
            if any(len(o.outputs[0].token_ids) != max_tokens for o in outputs):
                raise RuntimeError(f"a request did not generate {max_tokens} tokens")

        return _best_of(args, once, repeats)

    return timer


def hf_timer(args: argparse.Namespace, model: torch.nn.Module) -> Timer:
    def timer(prompts: list[list[int]], max_tokens: int, repeats: int) -> float:
        return _best_of(
            args, lambda: _hf_generate(model, prompts, max_tokens, args.device), repeats
        )

    return timer


def pd_engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """LLM options given on the command line; absent ones are left to LLM's defaults."""
    options: dict[str, Any] = {}
    if args.enforce_eager:
        options["enforce_eager"] = True
    if args.attention_backend is not None:
        options["attention_backend"] = args.attention_backend
    if args.async_scheduling:
        options["async_scheduling"] = True
    return options


def pd_model_shape(llm: LLM, config: dict, dtype: torch.dtype) -> ModelShape:
    """Counted from the loaded model; from the config where the engine hides it."""
    model = find_model(llm.engine)
    if model is not None:
        return shape_from_model(model, config)
    return shape_from_config(config, torch.empty((), dtype=dtype).element_size())


_ENGINE_PACKAGES = ("engine", "pd")  # the search descends only into their objects


def find_model(root: object, max_depth: int = 5) -> torch.nn.Module | None:
    """The module with the most parameters among ``root``'s attributes, searched
    ``max_depth`` levels deep (the engine holds it at ``runner.model`` or, after
    its worker split, at ``executor.worker.runner.model``)."""
    found: list[torch.nn.Module] = []
    level, seen = [root], {id(root)}
    for _ in range(max_depth):
        children = [v for obj in level for v in getattr(obj, "__dict__", {}).values()]
        level = []
        for value in children:
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, torch.nn.Module):
                found.append(value)
            elif type(value).__module__.split(".")[0] in _ENGINE_PACKAGES:
                level.append(value)
    return max(found, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def run_pd(args, name: str, model_dir: Path, refs: References) -> dict[str, Measure]:
    config = json.loads((model_dir / "config.json").read_text())
    work = PRESETS[name][1]
    measures = new_measures(work, args.long_context)
    start = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        dtype=_dtype_name(args),
        device=args.device,
        load_format="auto" if name == "tiny" else "dummy",
        max_model_len=min(args.max_model_len, config["max_position_embeddings"]),
        enable_prefix_caching=False,  # prompts repeat across timed runs
        seed=args.seed,
        **pd_engine_options(args),
    )
    measures["startup"].pd = time.perf_counter() - start
    shape = pd_model_shape(llm, config, getattr(torch, _dtype_name(args)))
    print(
        f"{name}: {shape.num_params / 1e6:.1f} M params, {shape.weight_bytes / 1e9:.3f} GB of "
        f"weights; pd start-up {measures['startup'].pd:.1f} s",
        flush=True,
    )
    measures["startup"].extra = {"num_params": shape.num_params, "weight_bytes": shape.weight_bytes}
    set_bounds(measures, shape, refs, work)
    timer, vocab = pd_timer(args, llm), config["vocab_size"]
    measures["decode"].pd = time_decode(timer, args, work, vocab)
    measures["ttft"].pd = time_ttft(timer, args, work, vocab)
    measures["batch"].pd = time_batch(timer, args, work, vocab)
    if args.long_context:
        _pd_long(args, llm, measures["long"], work, vocab)
    del llm, timer
    _free_memory(args.device)
    return measures


def _pd_long(args, llm: LLM, measure: Measure, work: Workload, vocab: int) -> None:
    """Many long prompts: completes (preempting as the KV cache fills) without running out."""
    prompts = fixed_len_prompts(work.long_num, work.long_prompt_len, vocab, args.seed + 3)
    scheduler = getattr(llm.engine, "scheduler", None)
    before = getattr(scheduler, "num_preemptions", None)
    try:
        measure.pd = pd_timer(args, llm)(prompts, work.long_output_len, 1)
    except torch.cuda.OutOfMemoryError:  # what this row is here to catch; keep the others
        measure.label += ", OUT OF MEMORY"
        measure.extra["error"] = "OOM"
    after = getattr(scheduler, "num_preemptions", None)
    preemptions = None if before is None or after is None else after - before
    measure.label += f", {'?' if preemptions is None else preemptions} preemptions"
    measure.extra["num_preemptions"] = preemptions


def build_hf_model(model_dir: Path, args: argparse.Namespace) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` built in place on the device."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, _dtype_name(args)))
    try:
        with torch.device(args.device):  # no CPU copy of 16 GB first
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def run_hf(args, name: str, model_dir: Path, measures: dict[str, Measure]) -> None:
    """Fill the HF column of ``measures`` with the prompts pd had."""
    work = PRESETS[name][1]
    start = time.perf_counter()
    model = build_hf_model(model_dir, args)
    measures["startup"].hf = time.perf_counter() - start
    print(f"{name}: HF attention implementation {model.config._attn_implementation}", flush=True)
    timer, vocab = hf_timer(args, model), model.config.vocab_size
    measures["decode"].hf = time_decode(timer, args, work, vocab)
    measures["ttft"].hf = time_ttft(timer, args, work, vocab)
    measures["batch"].hf = "—"
    if args.hf_batch:
        try:
            measures["batch"].hf = time_batch(timer, args, work, vocab)
        except torch.cuda.OutOfMemoryError:
            measures["batch"].hf = "OOM"
    del model, timer
    _free_memory(args.device)


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _dtype_name(args: argparse.Namespace) -> str:
    return "bfloat16" if args.device == "cuda" else "float32"


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


_UNIT_SCALE = {"s": 1.0, "ms": 1e3, "ms/token": 1e3}


def format_table(rows: list[tuple[str, Measure]]) -> str:
    lines = [
        "| measure | pd | bound | share | HF transformers |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in rows:
        scale = _UNIT_SCALE[m.unit]
        share = f"{m.bound / m.pd:.0%}" if m.bound is not None and m.pd else "n/a"
        hf = m.hf if isinstance(m.hf, str) else _number(m.hf, scale)
        pd, bound = _number(m.pd, scale), _number(m.bound, scale)
        lines.append(f"| {name} {m.label} ({m.unit}) | {pd} | {bound} | {share} | {hf} |")
    return "\n".join(lines)


def _number(seconds: float | None, scale: float) -> str:
    if seconds is None:
        return "n/a"
    value = seconds * scale
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def print_references(args: argparse.Namespace, refs: References) -> None:
    if refs.hbm_bytes_per_s is None or refs.matmul_flops_per_s is None:
        print(f"device {args.device}: no CUDA, so no references and no bounds (n/a)")
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        f"HBM bandwidth: {refs.hbm_bytes_per_s / 1e12:.2f} TB/s (1 GiB device copy, read + written)"
    )
    print(f"matmul rate:   {refs.matmul_flops_per_s / 1e12:.0f} TFLOP/s (8192^3 bf16 torch.matmul)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", choices=["all", *PRESETS], default="all", help="all: llama-8b and llama-1b"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--max-model-len", type=int, default=4608)
    parser.add_argument("--enforce-eager", action="store_true", help="passed to LLM")
    parser.add_argument("--async-scheduling", action="store_true", help="passed to LLM")
    parser.add_argument(
        "--attention-backend", choices=["auto", "sdpa", "triton"], help="passed to LLM"
    )
    parser.add_argument("--long-context", action="store_true", help="add 256 x (4000 in, 32 out)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-batch", action="store_true", help="HF runs the batch row too (slow)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs of a measure; the best counts"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (use --preset tiny --device cpu)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    names = ["llama-8b", "llama-1b"] if args.preset == "all" else [args.preset]
    # The engine's cuBLAS settings hold for the whole process from its first GEMM, which
    # the reference matmul below is; HF transformers runs under them too.
    prefer_single_kernel_gemms()
    refs = measure_references(args.device)
    print_references(args, refs)
    rows: list[tuple[str, Measure]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            config = PRESETS[name][0]
            folder = Path(tmp) / name
            model_dir = (
                make_tiny_model(folder) if config is None else write_dummy_model(folder, config)
            )
            measures = run_pd(args, name, model_dir, refs)
            if args.skip_hf:
                for measure in measures.values():
                    measure.hf = measure.hf or "skipped"
            else:
                run_hf(args, name, model_dir, measures)
            rows.extend((name, m) for m in measures.values())
    print()
    print_references(args, refs)
    print(format_table(rows))
    if args.json:
        result = {"args": vars(args), "references": asdict(refs)}
        result["measures"] = [{"preset": name, **asdict(m)} for name, m in rows]
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
