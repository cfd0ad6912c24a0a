"""Greedy reference outputs from HF transformers, one prompt at a time (no padding)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def hf_greedy(
    model_dir: Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    eos_token_id: int | None = None,
    repetition_penalty: float = 1.0,
) -> list[list[int]]:
    """``model_dir``: an HF folder, or a GGUF file (loaded by transformers' GGUF support).
    Without ``eos_token_id`` every output runs to ``max_new_tokens``."""
    if model_dir.suffix == ".gguf":
        source, extra = model_dir.parent, {"gguf_file": model_dir.name}
    else:
        source, extra = model_dir, {}
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, **extra).to(device)
    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            input_ids = torch.tensor([ids], device=device)
            generated = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_token_id,
                pad_token_id=0,
                repetition_penalty=repetition_penalty,
            )
            outputs.append(generated[0, len(ids) :].tolist())
    return outputs
