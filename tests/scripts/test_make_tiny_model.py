from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from scripts.make_tiny_model import ARCHS, ROPE_SCALINGS, make_tiny_model, parse_args
from scripts.tiny_moe_model import MOE_ARCHS

DENSE_ARCHS = [arch for arch in ARCHS if arch not in MOE_ARCHS]
# The MoE models have the default RoPE only (their shapes: tests/engine/test_moe_*.py).
ARCH_ROPES = [(a, r) for a in DENSE_ARCHS for r in ROPE_SCALINGS] + [(a, "none") for a in MOE_ARCHS]

TinyModelFactory = Callable[..., Path]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ("The keeper wrote", "灯塔 means lighthouse. 今天", "def mean(values):")
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is the 灯塔?"},
    {"role": "assistant", "content": "North 🌊."},
    {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
]
CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhere is the 灯塔?<|im_end|>\n"
    "<|im_start|>assistant\nNorth 🌊.<|im_end|>\n"
    "<|im_start|>user\nThanks<|im_end|>\n"
)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def load_all_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def file_bytes(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    first = make_tiny_model(tmp_path / "a", arch="qwen3", seed=7, rope_scaling="llama3")
    second = make_tiny_model(tmp_path / "b", arch="qwen3", seed=7, rope_scaling="llama3")
    assert file_bytes(first) == file_bytes(second)


def test_different_seed_changes_every_weight_but_not_tokenizer(
    tiny_model: TinyModelFactory,
) -> None:
    seed0, seed1 = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert tiny_model() == tiny_model("llama", dtype="float32") == seed0
    assert (seed0 / "tokenizer.json").read_bytes() == (seed1 / "tokenizer.json").read_bytes()
    weights0, weights1 = load_all_weights(seed0), load_all_weights(seed1)
    assert weights0.keys() == weights1.keys()
    for name in weights0:
        assert not torch.equal(weights0[name], weights1[name]), name


@pytest.mark.parametrize(("arch", "rope_scaling"), ARCH_ROPES)
def test_loads_in_hf_and_generates(
    tiny_model: TinyModelFactory, arch: str, rope_scaling: str
) -> None:
    model_dir = tiny_model(arch, rope_scaling=rope_scaling)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_hf(model_dir)
    config = read_json(model_dir / "config.json")
    assert config["vocab_size"] == len(tokenizer) == model.config.vocab_size
    expected_rope_type = "default" if rope_scaling == "none" else rope_scaling
    assert model.config.rope_parameters["rope_type"] == expected_rope_type
    input_ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > input_ids.shape[1]


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_config_shapes(tiny_model: TinyModelFactory, arch: str) -> None:
    config = read_json(tiny_model(arch) / "config.json")
    assert config["model_type"] == arch
    assert (config["hidden_size"], config["intermediate_size"]) == (64, 128)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["num_hidden_layers"] == (3 if arch == "qwen3" else 2)
    assert config.get("head_dim") == (32 if arch == "qwen3" else None)
    assert 400 <= config["vocab_size"] <= 600


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_is_not_degenerate(tiny_model: TinyModelFactory, arch: str) -> None:
    model_dir = tiny_model(arch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_hf(model_dir)
    gaps: list[float] = []
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                input_ids,
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                output_scores=True,
                return_dict_in_generate=True,
            )
        top2 = torch.cat(out.scores).topk(2, dim=-1).values
        gaps.extend((top2[:, 0] - top2[:, 1]).tolist())
        assert len(set(out.sequences[0, input_ids.shape[1] :].tolist())) >= 8
    assert sum(gap > 1e-3 for gap in gaps) >= 0.95 * len(gaps)


def test_sharded_index_matches_shards(tmp_path: Path, tiny_model: TinyModelFactory) -> None:
    model_dir = make_tiny_model(tmp_path, arch="qwen2", num_shards=3)
    assert not (model_dir / "model.safetensors").exists()
    index = read_json(model_dir / "model.safetensors.index.json")
    shard_names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == shard_names
    for shard in shard_names:
        with safe_open(model_dir / shard, framework="pt") as f:
            names = set(f.keys())
        assert names == {n for n, s in index["weight_map"].items() if s == shard}
    weights = load_all_weights(model_dir)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in weights.values())
    unsharded = load_all_weights(tiny_model("qwen2"))
    assert weights.keys() == unsharded.keys()
    assert all(torch.equal(weights[n], unsharded[n]) for n in weights)
    load_hf(model_dir)


def test_rewrite_with_fewer_shards_removes_stale_files(tmp_path: Path) -> None:
    make_tiny_model(tmp_path, arch="llama", num_shards=2)
    make_tiny_model(tmp_path, arch="llama")
    assert [p.name for p in tmp_path.glob("model*")] == ["model.safetensors"]


def test_tied_embeddings_omit_lm_head(tiny_model: TinyModelFactory) -> None:
    model_dir = tiny_model("qwen3", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_all_weights(model_dir)
    model = load_hf(model_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_qwen2_has_attention_biases(tiny_model: TinyModelFactory) -> None:
    weights = load_all_weights(tiny_model("qwen2"))
    for proj in ("q_proj", "k_proj", "v_proj"):
        bias = weights[f"model.layers.0.self_attn.{proj}.bias"]
        assert 0 < bias.abs().mean() < 0.5
    assert "model.layers.0.self_attn.o_proj.bias" not in weights


def test_cli_matches_function(tmp_path: Path) -> None:
    args = ["--arch", "llama", "--seed", "3", "--dtype", "bfloat16", "--rope-scaling", "linear"]
    args += ["--tie-word-embeddings", "--num-shards", "2"]
    out_dir = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "scripts/make_tiny_model.py", str(out_dir), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out_dir)
    expected = make_tiny_model(
        tmp_path / "function",
        arch="llama",
        seed=3,
        dtype="bfloat16",
        rope_scaling="linear",
        tie_word_embeddings=True,
        num_shards=2,
    )
    assert file_bytes(out_dir) == file_bytes(expected)
    assert all(t.dtype == torch.bfloat16 for t in load_all_weights(out_dir).values())
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype="auto")
    assert model.dtype == torch.bfloat16


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args([str(tmp_path), "--arch", "gpt2"])
    with pytest.raises(ValueError, match="num_shards"):
        make_tiny_model(tmp_path, num_shards=0)
    with pytest.raises(ValueError, match="dtype"):
        make_tiny_model(tmp_path, dtype="int8")


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_renders(tiny_model: TinyModelFactory, arch: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model(arch))
    bos = "<|begin_of_text|>" if arch == "llama" else ""
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered == bos + CHATML + "<|im_start|>assistant\n"
    closed = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)
    assert closed == bos + CHATML


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_special_tokens(tiny_model: TinyModelFactory, arch: str) -> None:
    model_dir = tiny_model(arch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("hello").input_ids
    if arch == "llama":
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    else:
        assert tokenizer.bos_token is None
        assert all(i < tokenizer.convert_tokens_to_ids("<|endoftext|>") for i in ids)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos_ids = [tokenizer.eos_token_id, im_end]
    assert GenerationConfig.from_pretrained(model_dir).eos_token_id == eos_ids
    assert tokenizer("<|im_end|>", add_special_tokens=False).input_ids == [im_end]


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_loaders_agree_and_split_multibyte(
    tiny_model: TinyModelFactory, arch: str
) -> None:
    model_dir = tiny_model(arch)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "René: 今天的风很大 🐋 2,394,880\n\tx = 1  \n"
    ids = raw.encode(text).ids
    assert tokenizer(text).input_ids == ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    emoji_ids = tokenizer("🐋", add_special_tokens=False).input_ids
    assert len(emoji_ids) > 1
    assert "\ufffd" in tokenizer.decode(emoji_ids[:1])
