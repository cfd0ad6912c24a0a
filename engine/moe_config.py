"""What a mixture-of-experts model's config.json says about its MoE layers.

Each architecture names the same things differently (``num_experts``,
``num_local_experts``, ``moe_num_experts``) and routes differently; ``MoeConfig``
holds them in one vocabulary, read by ``MoeConfig.from_hf`` for the model types we
serve. The router's math per architecture (HF transformers' modeling code):

============  =======================================================================
qwen3_moe     softmax over all experts -> top-k -> renormalise if ``norm_topk_prob``
mixtral       softmax over all experts -> top-k -> renormalise
granitemoe    top-k of the logits -> softmax over those k
ernie4_5_moe  float32 router; softmax -> top-k of (probs + e_score_correction_bias)
              -> the chosen probs (without the bias) / max(their sum, moe_norm_min);
              plus shared experts run on every token
============  =======================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MOE_MODEL_TYPES = ("qwen3_moe", "mixtral", "granitemoe", "ernie4_5_moe")


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int
    moe_intermediate_size: int  # of one expert
    moe_layers: tuple[int, ...]  # the layers whose MLP is sparse; the others stay dense
    softmax_before_topk: bool = True  # False: top-k of the logits, softmax over those k
    renormalize: bool = False  # divide the chosen weights by their sum
    norm_min: float = 0.0  # ... or by this, where their sum is smaller (ERNIE)
    has_score_correction_bias: bool = False  # ERNIE: added to the probs for choosing only
    router_float32: bool = False  # the router's weight and matmul stay float32 (ERNIE)
    num_shared_experts: int = 0  # ERNIE: one dense MLP of this many experts' width

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(
                f"MoE: top-k ({self.top_k}) must be between 1 and the number of experts "
                f"({self.num_experts})"
            )
        if self.moe_intermediate_size < 1:
            raise ValueError(f"MoE: moe_intermediate_size must be >= 1, got "
                             f"{self.moe_intermediate_size}")  # fmt: skip

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.num_shared_experts

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> MoeConfig | None:
        """The MoE part of an HF config; None for a dense model type."""
        model_type = hf.get("model_type", "")
        num_layers = int(hf["num_hidden_layers"])
        if model_type == "qwen3_moe":
            return _qwen3_moe(hf, num_layers)
        if model_type in ("mixtral", "granitemoe"):
            return cls(
                num_experts=int(hf["num_local_experts"]),
                top_k=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf["intermediate_size"]),
                moe_layers=tuple(range(num_layers)),
                softmax_before_topk=model_type == "mixtral",
                renormalize=model_type == "mixtral",
            )
        if model_type == "ernie4_5_moe":
            return _ernie4_5_moe(hf, num_layers)
        return None


def _qwen3_moe(hf: dict[str, Any], num_layers: int) -> MoeConfig:
    # Published configs say num_experts; transformers 5 writes num_local_experts.
    num_experts = int(hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"])
    step = int(hf.get("decoder_sparse_step", 1))
    dense = set(hf.get("mlp_only_layers") or ())
    sparse = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
    return MoeConfig(
        num_experts=num_experts,
        top_k=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        moe_layers=tuple(sparse) if num_experts > 0 else (),
        renormalize=bool(hf.get("norm_topk_prob", False)),
    )


def _ernie4_5_moe(hf: dict[str, Any], num_layers: int) -> MoeConfig:
    if hf.get("use_bias"):
        raise ValueError("ernie4_5_moe with use_bias=true (linear biases) is not supported")
    start = int(hf.get("moe_layer_start_index", 1))
    end = int(hf.get("moe_layer_end_index", -1))
    end = num_layers - 1 if end == -1 else end  # as Ernie4_5_MoeConfig reads it
    interval = int(hf.get("moe_layer_interval", 1))
    return MoeConfig(
        num_experts=int(hf["moe_num_experts"]),
        top_k=int(hf["moe_k"]),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        moe_layers=tuple(i for i in range(start, end + 1) if (i + 1) % interval == 0),
        renormalize=True,
        norm_min=float(hf.get("moe_norm_min", 1e-12)),
        has_score_correction_bias=True,
        router_float32=True,
        num_shared_experts=int(hf.get("moe_num_shared_experts", 0) or 0),
    )
