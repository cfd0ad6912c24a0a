"""Load HF safetensors checkpoints (single file or sharded) or GGUF files into a model.

Each checkpoint tensor is routed to the parameter that owns it; stacked
parameters (qkv_proj, gate_up_proj) are found through the model's
``packed_modules_mapping`` and each parameter's ``weight_loader`` copies in
its tensor-parallel shard.

MoE models (engine/models/moe.py) add class attributes: ``checkpoint_ignored``
(regexes of tensors to skip), ``checkpoint_renames`` ((regex, replacement) pairs,
applied first, for names that differ from our modules) and ``expert_weight_names``
(each expert's projection name in the checkpoint -> its shard of the stacked experts:
"w1" gate, "w3" up, "w2" down). A per-expert tensor ``<prefix>.experts.<e>.<name>.weight``
goes to ``<prefix>.experts.w13_weight`` or ``.w2_weight`` with its shard and expert id:
``weight_loader(param, t, shard, e)``; the stacked layers then name any piece missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.gguf_loader import is_gguf, iterate_gguf

# Checkpoint entries that are buffers we recompute, never parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {folder}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"model: checkpoint index names missing files: {', '.join(missing)}")
    return files


def iterate_checkpoint(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of a safetensors folder or a GGUF file."""
    if is_gguf(path):
        yield from iterate_gguf(path)
        return
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint at ``path`` (an HF folder
    or a GGUF file), each tensor cast to its parameter's dtype."""
    params = dict(model.named_parameters(remove_duplicate=False))
    names = _NameRules(model)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    loaded: set[str] = set()
    for name, tensor in iterate_checkpoint(path):
        if names.is_ignored(name) or (tied and name == "lm_head.weight"):
            continue
        target, shard_id, expert_id = names.resolve(name)
        param = params.get(target)
        if param is None:
            raise ValueError(f"model: checkpoint tensor {name!r} matches no parameter")
        tensor = tensor.to(param.dtype)
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            param.data.copy_(tensor)
        elif expert_id is not None:
            loader(param, tensor, shard_id, expert_id)
        elif shard_id is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard_id)
        loaded.add(target)
    _check_all_loaded(params, loaded, tied)
    _check_all_experts_loaded(model)


class _NameRules:
    """A model's way from checkpoint names to (parameter, shard id, expert id)."""

    def __init__(self, model: nn.Module):
        self.packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
        self.renames = [(re.compile(p), r) for p, r in getattr(model, "checkpoint_renames", ())]
        self.ignored = [re.compile(p) for p in getattr(model, "checkpoint_ignored", ())]
        self.expert_shards: dict[str, str] = getattr(model, "expert_weight_names", {})
        alternatives = "|".join(map(re.escape, self.expert_shards)) or "(?!)"
        self.expert = re.compile(rf"(.+\.experts)\.(\d+)\.({alternatives})\.weight")

    def is_ignored(self, name: str) -> bool:
        return name.endswith(_IGNORED_SUFFIXES) or any(p.search(name) for p in self.ignored)

    def resolve(self, name: str) -> tuple[str, object, int | None]:
        for pattern, replacement in self.renames:
            name = pattern.sub(replacement, name)
        match = self.expert.fullmatch(name)
        if match is not None:
            prefix, expert, projection = match.groups()
            shard_id = self.expert_shards[projection]
            param = "w2_weight" if shard_id == "w2" else "w13_weight"
            return f"{prefix}.{param}", shard_id, int(expert)
        for fragment, (stacked, shard_id) in self.packed.items():
            if f".{fragment}." in name:
                return name.replace(f".{fragment}.", f".{stacked}."), shard_id, None
        return name, None, None


def _check_all_loaded(params: dict[str, nn.Parameter], loaded: set[str], tied: bool) -> None:
    missing = [n for n in params if n not in loaded and not (tied and n == "lm_head.weight")]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"model: checkpoint lacks {len(missing)} parameters: {shown}")


def _check_all_experts_loaded(model: nn.Module) -> None:
    """Stacked experts fill piece by piece: each MoE layer names the pieces it lacks."""
    missing = [
        f"{name}: {piece}"
        for name, module in model.named_modules()
        for piece in getattr(module, "missing_experts", list)()
    ]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"model: checkpoint lacks {len(missing)} expert tensors: {shown}")


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights at real sizes, for benchmarks; norms stay at one.

    Drawn on each parameter's own device, so large models need no host copy.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        device = param.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        param.data.uniform_(-0.02, 0.02, generator=generators[device])
