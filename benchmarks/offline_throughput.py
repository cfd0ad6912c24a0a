"""Offline throughput: pd's ``LLM.generate`` vs HF ``transformers`` ``generate``.

Both engines get the same model, the same token-id prompts and the same
number of new tokens (eos ignored), measured in one run after a warm-up:

    python benchmarks/offline_throughput.py                      # tiny model, CPU
    python benchmarks/offline_throughput.py --preset llama-1b --device cuda --dtype bfloat16

``--preset tiny`` generates a tiny Llama with scripts/make_tiny_model.py;
``--preset llama-1b`` writes a Llama-3.2-1B-shaped config with random
weights (``load_format="dummy"`` for pd, ``from_config`` for HF) and a word-level
tokenizer of the same vocab size, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pd import LLM, SamplingParams
from scripts.make_tiny_model import make_tiny_model

LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def write_dummy_model(folder: Path, config: dict) -> Path:
    """A config-only model folder with a word-level tokenizer covering the vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    vocab = {f"w{i}": i for i in range(config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="w0", eos_token="w1", unk_token="w2"
    )
    fast.save_pretrained(str(folder))
    return folder


def make_prompts(num: int, mean_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [max(1, int(rng.uniform(0.5, 1.5) * mean_len)) for _ in range(num)]
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def run_pd(args, model_dir: Path, prompts: list[list[int]], dummy: bool) -> float:
    llm = LLM(
        model=str(model_dir),
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        load_format="dummy" if dummy else "auto",
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: min(4, len(prompts))], params)  # warm-up

    def once() -> None:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outputs)

    return best_of(args, once)


def run_hf(args, model_dir: Path, prompts: list[list[int]], dummy: bool) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    device = "cuda" if args.device == "cuda" else "cpu"
    if dummy:
        config = AutoConfig.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model = model.to(device).eval()
    batch = args.hf_batch_size or len(prompts)
    _hf_generate(model, prompts[: min(4, len(prompts))], args.output_len, device)  # warm-up

    def once() -> None:
        for i in range(0, len(prompts), batch):
            _hf_generate(model, prompts[i : i + batch], args.output_len, device)

    return best_of(args, once)


def best_of(args, run) -> float:
    """Fastest of ``--repeats`` timed runs: the least disturbed by other load."""
    times = []
    for _ in range(args.repeats):
        _sync(args.device)
        start = time.perf_counter()
        run()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    return min(times)


def _hf_generate(model, prompts: list[list[int]], new_tokens: int, device: str) -> None:
    width = max(len(p) for p in prompts)
    # Left padding, as HF batched generation expects.
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape[1] == width + new_tokens


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "llama-1b"], default="tiny")
    parser.add_argument("--model", help="an existing HF model folder instead of a preset")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64, help="mean prompt length")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--hf-batch-size", type=int, default=0, help="0: all prompts at once")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        dummy = args.model is None and args.preset == "llama-1b"
        if args.model:
            model_dir = Path(args.model)
        elif dummy:
            model_dir = write_dummy_model(Path(tmp) / "llama-1b", LLAMA_1B)
        else:
            model_dir = make_tiny_model(Path(tmp) / "tiny", arch="llama", seed=args.seed)
        vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts = make_prompts(args.num_prompts, args.input_len, vocab_size, args.seed)
        pd_seconds = run_pd(args, model_dir, prompts, dummy)
        hf_seconds = run_hf(args, model_dir, prompts, dummy)
    print_table(args, prompts, {"pd LLM.generate": pd_seconds, "HF generate": hf_seconds})


def print_table(args, prompts: list[list[int]], seconds: dict[str, float]) -> None:
    num_prompt = sum(len(p) for p in prompts)
    num_gen = len(prompts) * args.output_len
    model = args.model or args.preset
    print(
        f"\nmodel={model} device={args.device} dtype={args.dtype} requests={len(prompts)} "
        f"prompt_tokens={num_prompt} generated_tokens={num_gen} best_of={args.repeats}"
    )
    header = f"{'engine':<18}{'seconds':>10}{'gen tok/s':>12}{'total tok/s':>13}{'vs HF':>8}"
    print(header)
    print("-" * len(header))
    reference = seconds["HF generate"]
    for name, elapsed in seconds.items():
        print(
            f"{name:<18}{elapsed:>10.2f}{num_gen / elapsed:>12.1f}"
            f"{(num_gen + num_prompt) / elapsed:>13.1f}{reference / elapsed:>7.2f}x"
        )


if __name__ == "__main__":
    main()
