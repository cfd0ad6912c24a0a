"""Rotary position embedding (rotate-half / NeoX layout, as HF Llama and Qwen).

Interleaved RoPE (``RopeConfig.interleaved``) runs as this one over permuted q/k
weights (``interleaved_to_halves``).

Scaling types: "default", "linear" (positions divided by ``factor``) and
"llama3" (low frequencies stretched by ``factor``, high ones kept, a smooth
blend between ``low_freq_factor`` and ``high_freq_factor``).

On CUDA one Triton kernel (engine/kernels/fused_ops.py) rotates q and k in place, bit for
bit as ``forward_torch`` computes them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import RopeConfig
from engine.kernels import can_run_triton


def rope_inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    if rope.original_max_position_embeddings is None:
        raise ValueError("rope_scaling llama3 needs original_max_position_embeddings")
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig):
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, rope)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        freqs = torch.cat([freqs, freqs], dim=-1)  # HF repeats them over both halves
        # [max_position, head_dim] each, float32
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D], positions: [T]. On CUDA q and k rotate in place
        (they may be strided views of a fused qkv output) and are returned."""
        if can_run_triton(q):
            from engine.kernels import fused_ops  # NOTE: lazily: CPU-only installs lack triton

            fused_ops.rotary_embedding_(positions, q, k, self.cos_cache, self.sin_cache)
            return q, k
        return self.forward_torch(positions, q, k)

    def forward_torch(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference formula (new tensors; q and k rotate as one): the CPU path, and
        what the CUDA kernel reproduces."""
        cos = self.cos_cache[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin_cache[positions].unsqueeze(1)
        qk = torch.cat([q, k], dim=1)
        x1, x2 = qk.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)  # HF's rotate_half
        qk = (qk * cos + rotated * sin).to(q.dtype)
        return qk.split([q.size(1), k.size(1)], dim=1)


def interleaved_to_halves(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A q or k projection's rows (or bias), head by head, from interleaved-RoPE order to
    rotate-half order: each head's dims 0, 2, 4, .., 1, 3, 5, ...

    Interleaved RoPE (ERNIE-4.5) rotates the pairs (2i, 2i+1) by angle i; rotate-half
    RoPE rotates (i, i + D/2) by the same angle. With q and k dims so permuted at load
    time, rotate-half computes exactly the interleaved rotation, and q . k (a sum over
    all dims) is unchanged, so the model keeps one RoPE and its fused CUDA kernels.
    NOTE: the cached keys are in the permuted order; only this model reads them.
    """
    # [heads * D, ...] -> [heads, D/2, 2, ...] -> [heads, 2, D/2, ...]
    return rows.unflatten(0, (-1, head_dim // 2, 2)).transpose(1, 2).flatten(0, 2)
