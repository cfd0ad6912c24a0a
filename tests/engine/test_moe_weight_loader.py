"""Loading MoE checkpoints: per-expert tensors (Qwen3-MoE, Mixtral, ERNIE) and stacked
ones (GraniteMoE) land in the stacked expert parameters; a missing expert is named;
ERNIE's multi-token-prediction tensors are skipped and its router stays float32; dummy
weights fill every MoE parameter; config.json's MoE fields are read; TP sizes that
cannot split the experts are refused."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig, ModelConfig, SchedulerConfig
from engine.weight_loader import load_weights
from tests.engine.test_weight_loader import build

LIMITS = SchedulerConfig(max_model_len=64)


def copy_config(source, target) -> None:  # type: ignore[no-untyped-def]
    for name in ("config.json", "generation_config.json"):
        shutil.copy(source / name, target / name)


@pytest.mark.parametrize(
    ("arch", "gate", "up", "down"),
    [
        ("qwen3_moe", "mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj",
         "mlp.experts.{e}.down_proj"),
        ("mixtral", "block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
         "block_sparse_moe.experts.{e}.w2"),
    ],
)  # fmt: skip
def test_per_expert_tensors_fill_the_stacked_experts(tiny_model, arch, gate, up, down):
    model_dir = tiny_model(arch)
    _, model = build(model_dir)
    load_weights(model, model_dir)
    checkpoint = load_file(str(model_dir / "model.safetensors"))
    experts = model.model.layers[0].mlp.experts
    for e in range(experts.num_experts):
        prefix = "model.layers.0."
        expected = torch.cat([checkpoint[prefix + gate.format(e=e) + ".weight"],
                              checkpoint[prefix + up.format(e=e) + ".weight"]])  # fmt: skip
        assert torch.equal(experts.w13_weight[e], expected)
        assert torch.equal(experts.w2_weight[e], checkpoint[prefix + down.format(e=e) + ".weight"])


def test_granite_stacked_experts_and_router_load(tiny_model):
    model_dir = tiny_model("granitemoe")
    _, model = build(model_dir)
    load_weights(model, model_dir)
    checkpoint = load_file(str(model_dir / "model.safetensors"))
    block = model.model.layers[1].mlp
    prefix = "model.layers.1.block_sparse_moe."
    assert torch.equal(block.experts.w13_weight, checkpoint[prefix + "input_linear.weight"])
    assert torch.equal(block.experts.w2_weight, checkpoint[prefix + "output_linear.weight"])
    assert torch.equal(block.gate.weight, checkpoint[prefix + "router.layer.weight"])


def test_a_missing_expert_is_named(tiny_model, tmp_path):
    source = tiny_model("qwen3_moe")
    copy_config(source, tmp_path)
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _, model = build(tmp_path)
    with pytest.raises(ValueError, match=r"lacks 1 expert tensors: .*layers\.2.*expert 5 w3"):
        load_weights(model, tmp_path)


def test_ernie_skips_mtp_tensors_and_keeps_its_router_float32(tiny_model, tmp_path):
    source = tiny_model("ernie4_5_moe")
    copy_config(source, tmp_path)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.mtp_linear_proj.0.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _, model = build(tmp_path, "bfloat16")
    load_weights(model, tmp_path)
    block = model.model.layers[1].mlp
    assert block.gate.weight.dtype == torch.float32
    assert block.gate.e_score_correction_bias.dtype == torch.float32
    assert block.experts.w13_weight.dtype == torch.bfloat16
    bias = tensors["model.layers.1.mlp.moe_statics.e_score_correction_bias"]
    assert torch.equal(block.gate.e_score_correction_bias, bias)
    assert not isinstance(model.model.layers[0].mlp, type(block))  # the first layer is dense


def test_moe_fields_of_config_json_are_read(tiny_model):
    config = ModelConfig.from_pretrained(tiny_model("ernie4_5_moe"))
    moe = config.moe
    assert (moe.num_experts, moe.top_k, moe.moe_intermediate_size) == (8, 2, 32)
    assert moe.moe_layers == (1, 2) and moe.num_shared_experts == 2
    assert moe.has_score_correction_bias and moe.router_float32 and moe.renormalize
    assert config.rope.interleaved and config.rope.theta == 500000.0
    granite = ModelConfig.from_pretrained(tiny_model("granitemoe"))
    assert not granite.moe.softmax_before_topk
    assert granite.multipliers.embedding == 4.0 and granite.multipliers.attention == 0.1
    qwen = ModelConfig.from_pretrained(tiny_model("qwen3_moe")).moe
    assert qwen.moe_layers == (0, 2) and qwen.renormalize and qwen.num_experts == 8
    assert ModelConfig.from_pretrained(tiny_model("llama")).moe is None


def test_engine_config_refuses_experts_the_tp_group_cannot_split(tiny_model):
    config = ModelConfig.from_pretrained(tiny_model("qwen3_moe"))
    six_experts = dataclasses.replace(config, moe=dataclasses.replace(config.moe, num_experts=6))
    with pytest.raises(ValueError, match=r"divisible by 4; the model has 6"):
        EngineConfig(
            model=six_experts, scheduler=LIMITS, tensor_parallel_size=4, enable_expert_parallel=True
        )
    EngineConfig(
        model=six_experts, scheduler=LIMITS, tensor_parallel_size=4
    )  # each expert split: fine
    narrow = dataclasses.replace(
        config, moe=dataclasses.replace(config.moe, moe_intermediate_size=6)
    )
    with pytest.raises(ValueError, match=r"intermediate size \(6\)"):
        EngineConfig(model=narrow, scheduler=LIMITS, tensor_parallel_size=4)
    EngineConfig(
        model=narrow, scheduler=LIMITS, tensor_parallel_size=4, enable_expert_parallel=True
    )
