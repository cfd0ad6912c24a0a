"""Write a tiny random-weight model in Hugging Face format, for tests.

The output folder holds config.json, model.safetensors (or shards plus
model.safetensors.index.json), tokenizer.json, tokenizer_config.json and
generation_config.json, and loads offline with ``transformers``. The tokenizer
is a byte-level BPE trained on the bundled ``tiny_corpus.txt``. Same arguments
give byte-identical files. The mixture-of-experts archs are described in
scripts/tiny_moe_model.py.

    python -m scripts.make_tiny_model OUT --arch qwen3 --seed 1 --num-shards 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from scripts.tiny_moe_model import MOE_ARCHS, is_moe_layer, moe_config, moe_mlp_weights

ARCHS = ("llama", "qwen2", "qwen3", *MOE_ARCHS)
DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALINGS = ("none", "llama3", "linear")

CORPUS_PATH = Path(__file__).resolve().parent / "tiny_corpus.txt"
# NOTE: the trainer's size excludes the special tokens, which are appended after
# training (ids at the end of the vocab, as in Llama-3 and Qwen). The total is
# deliberately not a power of two, so vocab padding for TP is exercised.
NUM_BPE_TOKENS = 496
MAX_POSITION_EMBEDDINGS = 1024

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BEGIN_OF_TEXT = "<|begin_of_text|>"

# Pre-tokenizer split patterns of Llama-3 and Qwen2 (Qwen splits digits singly).
# NOTE: transformers' Qwen2Tokenizer rebuilds its pipeline (NFC + this regex)
# rather than reading it from tokenizer.json; qwen tokenizers here match it, so
# every loading path encodes alike.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- if bos_token is defined and bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ROPE_SCALING_PARAMS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "linear": {"rope_type": "linear", "factor": 2.0},
}

ARCH_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class InitScales:
    """Standard deviations of the random weights.

    Matrices are N(0, (gain / sqrt(fan_in))^2), so each sub-layer writes a term
    of about ``gain`` into the residual stream. The embeddings are small next to
    those terms: the prediction then depends on the context and on positions
    (RoPE bugs change greedy tokens), and a tied lm_head does not just echo the
    current token. The logit spread (about ``lm_head_gain``, or
    ``embed_std * sqrt(hidden_size)`` when tied) keeps top-1 and top-2 logits
    apart by far more than float32 noise.
    """

    embed_std: float = 0.25
    qk_gain: float = 1.5
    v_gain: float = 1.0
    o_gain: float = 1.5
    mlp_gain: float = 1.0
    down_gain: float = 3.0
    lm_head_gain: float = 6.0
    norm_noise_std: float = 0.1
    bias_std: float = 0.1


INIT_SCALES = InitScales()


@dataclass(frozen=True)
class SpecialTokens:
    """Special-token strings and their ids in the trained vocab."""

    bos: str | None
    bos_id: int
    eos_id: int
    im_end_id: int


def train_tokenizer(arch: str) -> Tokenizer:
    """Train the byte-level BPE on the bundled corpus (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    split_pattern = LLAMA3_SPLIT_PATTERN if arch == "llama" else QWEN2_SPLIT_PATTERN
    if arch != "llama":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_BPE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS_PATH.read_text(encoding="utf-8")], trainer=trainer)
    tokenizer.add_special_tokens(_special_token_strings(arch))
    tokenizer.post_processor = _post_processor(arch, tokenizer)
    return tokenizer


def _special_token_strings(arch: str) -> list[str]:
    specials = [END_OF_TEXT, IM_START, IM_END]
    return [*specials, BEGIN_OF_TEXT] if arch == "llama" else specials


def _post_processor(arch: str, tokenizer: Tokenizer) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    if arch != "llama":
        return byte_level
    bos_id = tokenizer.token_to_id(BEGIN_OF_TEXT)
    prepend_bos = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A",
        pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT}:1 $B:1",
        special_tokens=[(BEGIN_OF_TEXT, bos_id)],
    )
    return processors.Sequence([byte_level, prepend_bos])


def special_tokens(arch: str, tokenizer: Tokenizer) -> SpecialTokens:
    eos_id = tokenizer.token_to_id(END_OF_TEXT)
    # Qwen names <|endoftext|> as its config bos id but never prepends it.
    bos = BEGIN_OF_TEXT if arch == "llama" else None
    bos_id = tokenizer.token_to_id(bos) if bos is not None else eos_id
    return SpecialTokens(
        bos=bos, bos_id=bos_id, eos_id=eos_id, im_end_id=tokenizer.token_to_id(IM_END)
    )


def build_config(
    arch: str,
    vocab_size: int,
    specials: SpecialTokens,
    dtype: str,
    rope_scaling: str,
    tie_word_embeddings: bool,
    max_position_embeddings: int = MAX_POSITION_EMBEDDINGS,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": [ARCH_CLASSES.get(arch)],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3 if arch == "qwen3" else 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": ROPE_SCALING_PARAMS[rope_scaling],
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": specials.bos_id,
        "eos_token_id": specials.eos_id,
    }
    if arch in MOE_ARCHS:
        return moe_config(arch, config)  # from transformers' config class, on these sizes
    config.update(_arch_config(arch, config["num_hidden_layers"]))
    return config


def _arch_config(arch: str, num_layers: int) -> dict[str, Any]:
    if arch == "llama":
        return {"attention_bias": False, "mlp_bias": False}
    sliding = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": num_layers}
    if arch == "qwen2":
        return sliding
    # NOTE: head_dim is set explicitly and differs from hidden_size / num_heads
    # (64 / 4 = 16), so q/o projections are not square: that path gets tested.
    return {**sliding, "head_dim": 32, "attention_bias": False}


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


class _WeightSampler:
    """Draws weights in a fixed order from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=torch.float32) * std

    def linear(self, out_features: int, in_features: int, gain: float) -> torch.Tensor:
        return self.normal((out_features, in_features), gain / math.sqrt(in_features))

    def norm(self, size: int) -> torch.Tensor:
        return 1.0 + self.normal((size,), INIT_SCALES.norm_noise_std)

    def bias(self, size: int) -> torch.Tensor:
        return self.normal((size,), INIT_SCALES.bias_std)


def build_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights named exactly as in HF checkpoints."""
    sampler = _WeightSampler(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    weights = {"model.embed_tokens.weight": sampler.normal((vocab, hidden), INIT_SCALES.embed_std)}
    for layer in range(config["num_hidden_layers"]):
        weights.update(_layer_weights(config, sampler, layer))
    weights["model.norm.weight"] = sampler.norm(hidden)
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = sampler.linear(vocab, hidden, INIT_SCALES.lm_head_gain)
    return weights


def _layer_weights(
    config: dict[str, Any], sampler: _WeightSampler, layer: int
) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}."
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_size = config["num_attention_heads"] * head_dim(config)
    kv_size = config["num_key_value_heads"] * head_dim(config)
    attn = prefix + "self_attn."
    weights = {prefix + "input_layernorm.weight": sampler.norm(hidden)}
    for name, size, gain in (
        ("q_proj", q_size, INIT_SCALES.qk_gain),
        ("k_proj", kv_size, INIT_SCALES.qk_gain),
        ("v_proj", kv_size, INIT_SCALES.v_gain),
    ):
        weights[f"{attn}{name}.weight"] = sampler.linear(size, hidden, gain)
        if config["model_type"] == "qwen2":
            weights[f"{attn}{name}.bias"] = sampler.bias(size)
    if config["model_type"] in ("qwen3", "qwen3_moe"):
        weights[attn + "q_norm.weight"] = sampler.norm(head_dim(config))
        weights[attn + "k_norm.weight"] = sampler.norm(head_dim(config))
    weights[attn + "o_proj.weight"] = sampler.linear(hidden, q_size, INIT_SCALES.o_gain)
    weights[prefix + "post_attention_layernorm.weight"] = sampler.norm(hidden)
    if config["model_type"] in MOE_ARCHS and is_moe_layer(config, layer):
        weights.update(moe_mlp_weights(config, sampler, prefix, INIT_SCALES))
        return weights
    weights[prefix + "mlp.gate_proj.weight"] = sampler.linear(inter, hidden, INIT_SCALES.mlp_gain)
    weights[prefix + "mlp.up_proj.weight"] = sampler.linear(inter, hidden, INIT_SCALES.mlp_gain)
    weights[prefix + "mlp.down_proj.weight"] = sampler.linear(hidden, inter, INIT_SCALES.down_gain)
    return weights


def write_weights(out_dir: Path, weights: dict[str, torch.Tensor], num_shards: int) -> None:
    """One model.safetensors, or HF-style shards plus their index."""
    # NOTE: weight files of an earlier run with another shard count would
    # otherwise sit beside the new ones and confuse loaders.
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if num_shards == 1:
        save_file(weights, str(out_dir / "model.safetensors"), metadata=metadata)
        return
    names = list(weights)
    weight_map: dict[str, str] = {}
    for shard in range(num_shards):
        file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        begin, end = (shard * len(names) // num_shards, (shard + 1) * len(names) // num_shards)
        shard_names = names[begin:end]
        save_file({n: weights[n] for n in shard_names}, str(out_dir / file_name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard_names, file_name))
    total_size = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / "model.safetensors.index.json", index)


def tokenizer_config(
    specials: SpecialTokens, max_position_embeddings: int = MAX_POSITION_EMBEDDINGS
) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials.bos,
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config(specials: SpecialTokens) -> dict[str, Any]:
    return {"bos_token_id": specials.bos_id, "eos_token_id": [specials.eos_id, specials.im_end_id]}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _validate(arch: str, dtype: str, rope_scaling: str, num_shards: int) -> None:
    for what, value, allowed in (
        ("arch", arch, ARCHS),
        ("dtype", dtype, DTYPES),
        ("rope_scaling", rope_scaling, ROPE_SCALINGS),
    ):
        if value not in allowed:
            raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if arch in MOE_ARCHS and rope_scaling != "none":
        raise ValueError(f"the tiny {arch} model has no rope_scaling variants")


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    rope_scaling: str = "none",
    tie_word_embeddings: bool = False,
    num_shards: int = 1,
    max_position_embeddings: int = MAX_POSITION_EMBEDDINGS,
) -> Path:
    """Write the tiny model into ``out_dir`` (created if missing); return its path.
    ``max_position_embeddings``: the context length it claims (the weights are the same
    whatever it is; a long one lets a test keep a command line's --max-model-len)."""
    _validate(arch, dtype, rope_scaling, num_shards)
    tokenizer = train_tokenizer(arch)
    specials = special_tokens(arch, tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    config = build_config(
        arch, vocab_size, specials, dtype, rope_scaling, tie_word_embeddings,
        max_position_embeddings,
    )  # fmt: skip
    weights = build_weights(config, seed)
    if num_shards > len(weights):
        raise ValueError(f"num_shards must be <= {len(weights)} (the tensor count)")
    torch_dtype = getattr(torch, dtype)
    weights = {name: t.to(torch_dtype).contiguous() for name, t in weights.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out, weights, num_shards)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config(specials))
    _write_json(out / "tokenizer_config.json", tokenizer_config(specials, max_position_embeddings))
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the model into")
    parser.add_argument("--arch", choices=ARCHS, default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--rope-scaling", choices=ROPE_SCALINGS, default="none")
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--num-shards", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = make_tiny_model(
            args.out_dir,
            arch=args.arch,
            seed=args.seed,
            dtype=args.dtype,
            rope_scaling=args.rope_scaling,
            tie_word_embeddings=args.tie_word_embeddings,
            num_shards=args.num_shards,
        )
    except ValueError as exc:
        print(f"make_tiny_model: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
