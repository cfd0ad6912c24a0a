"""Lower bounds on ``generate`` from a model's shape and the device's measured rates.

The rates are measured on the device: HBM bandwidth as a device-to-device copy
(bytes read + written per second) and the matmul
rate of an n^3 bf16 ``torch.matmul``, each the best of several CUDA-event-timed runs.

  - A prefill costs its FLOPs at the matmul rate: 2 x non-embedding params per
    prompt token, 2 x 2 x layers x heads x head_dim x s^2/2 of causal attention per
    prompt of s tokens, and the lm_head for the one row that samples.
  - A decode step costs max(bytes / bandwidth, FLOPs / matmul rate), where the bytes
    are all weights plus the KV every sequence reads at its context length.

NOTE: the first token of a request comes from its prefill, so ``max_tokens=N`` costs
one prefill and N - 1 decode steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from scripts.make_tiny_model import head_dim


@dataclass(frozen=True)
class References:
    """Rates measured on the device in this run; None without CUDA."""

    hbm_bytes_per_s: float | None = None
    matmul_flops_per_s: float | None = None


def measure_references(device: str) -> References:
    if device != "cuda":
        return References()
    refs = References(hbm_bytes_per_s=copy_rate(1 << 30), matmul_flops_per_s=_matmul_rate(8192))
    torch.cuda.empty_cache()
    return refs


def copy_rate(num_bytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * num_bytes / _best_cuda_time(lambda: dst.copy_(src), repeats=10)


def _matmul_rate(n: int) -> float:
    """FLOP/s of an n x n x n bf16 matmul."""
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    out = torch.empty_like(a)
    return 2 * n**3 / _best_cuda_time(lambda: torch.matmul(a, b, out=out), repeats=10)


def _best_cuda_time(run: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` CUDA-event-timed runs, after one warm-up."""
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


@dataclass(frozen=True)
class ModelShape:
    """What the bounds need to know of a model; per-token counts cover all layers."""

    num_params: int
    weight_bytes: int
    kv_bytes_per_token: int
    flops_per_token: int  # matmuls through the layers: 2 x non-embedding params
    flops_per_query_key: int  # attention of one query against one key: QK^T and PV
    lm_head_flops: int  # the logits of one sampling row

    @classmethod
    def build(
        cls, config: dict, num_params: int, num_embedding: int, weight_bytes: int, dtype_bytes: int
    ) -> ModelShape:
        num_layers, dim = config["num_hidden_layers"], head_dim(config)
        return cls(
            num_params=num_params,
            weight_bytes=weight_bytes,
            kv_bytes_per_token=2 * num_layers * config["num_key_value_heads"] * dim * dtype_bytes,
            flops_per_token=2 * (num_params - num_embedding),
            flops_per_query_key=2 * 2 * num_layers * config["num_attention_heads"] * dim,
            lm_head_flops=2 * config["vocab_size"] * config["hidden_size"],
        )


def shape_from_model(model: torch.nn.Module, config: dict) -> ModelShape:
    params = dict(model.named_parameters())  # a tied lm_head is listed once
    embedding = [n for n in params if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    return ModelShape.build(
        config,
        num_params=sum(p.numel() for p in params.values()),
        num_embedding=sum(params[n].numel() for n in embedding),
        weight_bytes=sum(p.numel() * p.element_size() for p in params.values()),
        dtype_bytes=next(iter(params.values())).element_size(),
    )


def shape_from_config(config: dict, dtype_bytes: int) -> ModelShape:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_size = config["num_attention_heads"] * head_dim(config)
    kv_size = config["num_key_value_heads"] * head_dim(config)
    per_layer = hidden * (2 * q_size + 2 * kv_size) + 3 * hidden * inter + 2 * hidden
    num_embedding = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)
    num_params = config["num_hidden_layers"] * per_layer + hidden + num_embedding
    return ModelShape.build(
        config, num_params, num_embedding, num_params * dtype_bytes, dtype_bytes
    )


def generate_bound(
    shape: ModelShape, refs: References, prompt_lens: list[int], max_tokens: int
) -> float | None:
    """Lower bound on ``generate`` of these prompts with ``max_tokens`` each."""
    if refs.hbm_bytes_per_s is None or refs.matmul_flops_per_s is None:
        return None
    prefill_flops = sum(
        shape.flops_per_token * s + shape.flops_per_query_key * s * s / 2 + shape.lm_head_flops
        for s in prompt_lens
    )
    seconds = prefill_flops / refs.matmul_flops_per_s
    num_seqs, num_prompt_tokens = len(prompt_lens), sum(prompt_lens)
    for step in range(1, max_tokens):
        num_keys = num_prompt_tokens + step * num_seqs  # each sequence reads its whole context
        flops = num_seqs * (shape.flops_per_token + shape.lm_head_flops)
        flops += shape.flops_per_query_key * num_keys
        num_bytes = shape.weight_bytes + shape.kv_bytes_per_token * num_keys
        seconds += max(num_bytes / refs.hbm_bytes_per_s, flops / refs.matmul_flops_per_s)
    return seconds
