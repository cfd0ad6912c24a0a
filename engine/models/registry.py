"""HF ``architectures`` name -> model class."""

from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaForCausalLM, Qwen3ForCausalLM
from engine.models.moe import (
    Ernie4_5_MoeForCausalLM,
    GraniteMoeForCausalLM,
    MixtralForCausalLM,
    Qwen3MoeForCausalLM,
)

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "GraniteMoeForCausalLM": GraniteMoeForCausalLM,
    "Ernie4_5_MoeForCausalLM": Ernie4_5_MoeForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        supported = ", ".join(sorted(_MODELS))
        raise ValueError(f"architecture {architecture!r} is not supported (supported: {supported})")
    return _MODELS[architecture]
