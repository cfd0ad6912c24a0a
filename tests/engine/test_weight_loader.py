from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig, ModelConfig, SchedulerConfig
from engine.distributed import ParallelGroup
from engine.models.registry import get_model_class
from engine.weight_loader import init_dummy_weights, load_weights


def build(model_dir, dtype="float32"):
    config = ModelConfig.from_pretrained(model_dir, dtype)
    with torch.device("cpu"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(config.dtype)
        try:
            model = get_model_class(config.architecture)(config, 64, ParallelGroup.single())
        finally:
            torch.set_default_dtype(previous)
    return config, model


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sharded_checkpoint_loads_like_a_single_file(tiny_model):
    _, single = build(tiny_model("qwen2"))
    load_weights(single, tiny_model("qwen2"))
    sharded_dir = tiny_model("qwen2", num_shards=3)
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    _, sharded = build(sharded_dir)
    load_weights(sharded, sharded_dir)
    expected = state(single)
    for name, tensor in state(sharded).items():
        assert torch.equal(tensor, expected[name]), name


def test_stacked_projections_hold_the_checkpoint_tensors(tiny_model):
    model_dir = tiny_model("qwen2")
    _, model = build(model_dir)
    load_weights(model, model_dir)
    checkpoint = load_file(str(model_dir / "model.safetensors"))
    attn = model.model.layers[1].self_attn
    prefix = "model.layers.1.self_attn."
    expected = torch.cat([checkpoint[prefix + f"{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(attn.qkv_proj.weight, expected)
    expected_bias = torch.cat([checkpoint[prefix + f"{p}_proj.bias"] for p in "qkv"])
    assert torch.equal(attn.qkv_proj.bias, expected_bias)


def test_bf16_checkpoint_dtype_auto_and_upcast(tiny_model):
    model_dir = tiny_model("llama", dtype="bfloat16")
    config, model = build(model_dir, "auto")
    assert config.dtype == torch.bfloat16
    load_weights(model, model_dir)
    assert model.lm_head.weight.dtype == torch.bfloat16
    _, model32 = build(model_dir, "float32")
    load_weights(model32, model_dir)
    assert torch.equal(model32.lm_head.weight, model.lm_head.weight.float())


def test_tied_embeddings_share_one_tensor(tiny_model):
    model_dir = tiny_model("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(model_dir / "model.safetensors"))
    _, model = build(model_dir)
    load_weights(model, model_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_missing_and_unknown_tensors_are_named(tiny_model, tmp_path):
    source = tiny_model("llama")
    for name in ("config.json", "generation_config.json"):
        shutil.copy(source / name, tmp_path / name)
    tensors = load_file(str(source / "model.safetensors"))
    missing = dict(tensors)
    del missing["model.norm.weight"]
    save_file(missing, str(tmp_path / "model.safetensors"))
    _, model = build(tmp_path)
    with pytest.raises(ValueError, match=r"lacks 1 parameters: model\.norm\.weight"):
        load_weights(model, tmp_path)
    extra = dict(tensors, **{"model.layers.0.mystery.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="mystery"):
        load_weights(model, tmp_path)


def test_no_checkpoint_and_no_config_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no config\.json"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_weights(torch.nn.Linear(1, 1), tmp_path)


def test_rope_parameters_of_transformers_5_are_read(tiny_model, tmp_path):
    hf = json.loads((tiny_model("llama") / "config.json").read_text())
    del hf["rope_theta"], hf["rope_scaling"]
    hf["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    rope = ModelConfig.from_pretrained(tmp_path).rope
    assert (rope.rope_type, rope.factor, rope.theta) == ("linear", 4.0, 5e5)
    hf["rope_parameters"]["rope_type"] = "yarn"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "mixtral", "granitemoe", "ernie4_5_moe"])
def test_dummy_weights_fill_every_parameter(tiny_model, arch):
    _, model = build(tiny_model(arch))
    for param in model.parameters():
        param.data.fill_(float("nan"))
    init_dummy_weights(model, seed=0)
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name


def test_max_model_len_beyond_the_model_is_rejected(tiny_model):
    config = ModelConfig.from_pretrained(tiny_model("llama"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        EngineConfig(model=config, scheduler=SchedulerConfig(max_model_len=4096))
