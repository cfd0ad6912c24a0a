"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3).

Qwen2 adds q/k/v biases (``attention_bias``); Qwen3 adds RMSNorm over each
head of q and k before RoPE (``qk_norm``); Granite's scalars
(``config.multipliers``) scale embeddings, residual branches, attention and logits.
Module attribute names equal the HF checkpoint keys, except the stacked
projections listed in ``packed_modules_mapping``. The MoE models
(engine/models/moe.py) are this decoder with other MLPs (``mlp_for_layer``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from engine.config import ModelConfig
from engine.distributed import ParallelGroup
from engine.forward_context import get_attention_metadata
from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.layernorm import RMSNorm
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.rotary import RotaryEmbedding, interleaved_to_halves

MlpFactory = Callable[[int], nn.Module]  # layer index -> that layer's MLP


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, max_position: int, qk_norm: bool, tp: ParallelGroup):
        super().__init__()
        head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            tp,
            bias=config.attention_bias,
        )
        self.num_heads = self.qkv_proj.num_local_heads
        self.num_kv_heads = self.qkv_proj.num_local_kv_heads
        self.head_dim = head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim, config.hidden_size, tp, bias=False
        )
        self.rotary_emb = RotaryEmbedding(head_dim, max_position, config.rope)
        if config.rope.interleaved:
            self.qkv_proj.weight.weight_loader = _loading_interleaved_rope(
                self.qkv_proj.weight_loader, head_dim
            )
        scale = config.multipliers.attention
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5 if scale is None else scale
        )
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hk, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # RoPE happens in the attention layer: its backend may fuse it with the KV store.
        return self.o_proj(self.attn(positions, q, k, v, self.rotary_emb))


def _loading_interleaved_rope(loader, head_dim: int):  # type: ignore[no-untyped-def]
    """``loader`` of the qkv weight, with each q and k head's rows put in rotate-half
    order first (engine/layers/rotary.py, ``interleaved_to_halves``)."""

    def load(param, loaded: torch.Tensor, shard_id=None) -> None:  # type: ignore[no-untyped-def]
        if shard_id in ("q", "k"):
            loaded = interleaved_to_halves(loaded, head_dim)
        loader(param, loaded, shard_id)

    return load


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: ParallelGroup, intermediate_size: int = 0):
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        max_position: int,
        qk_norm: bool,
        tp: ParallelGroup,
        mlp: nn.Module | None = None,
    ):
        super().__init__()
        self.self_attn = LlamaAttention(config, max_position, qk_norm, tp)
        self.mlp = mlp if mlp is not None else LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_multiplier = config.multipliers.residual

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.forward_with_residual(hidden, residual)
        hidden = self._scale(self.self_attn(positions, hidden))
        hidden, residual = self.post_attention_layernorm.forward_with_residual(hidden, residual)
        return self._scale(self.mlp(hidden)), residual

    def _scale(self, branch: torch.Tensor) -> torch.Tensor:
        """Granite: residual + branch * m (the next norm adds the residual)."""
        return branch if self.residual_multiplier == 1.0 else branch * self.residual_multiplier


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        max_position: int,
        qk_norm: bool,
        tp: ParallelGroup,
        mlp_for_layer: MlpFactory | None = None,
    ):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                config, max_position, qk_norm, tp, mlp_for_layer(i) if mlp_for_layer else None
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embedding_multiplier = config.multipliers.embedding

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm.forward_with_residual(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    qk_norm: ClassVar[bool] = False
    # checkpoint name fragment -> (our stacked parameter fragment, shard id)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        config: ModelConfig,
        max_position: int,
        tp: ParallelGroup,
        mlp_for_layer: MlpFactory | None = None,
    ):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position, self.qk_norm, tp, mlp_for_layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the rows that sample this step: [S, vocab]."""
        logits = self.lm_head(hidden[get_attention_metadata().logits_index])
        scaling = self.config.multipliers.logits_scaling
        return logits if scaling == 1.0 else logits / scaling


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm: ClassVar[bool] = True
