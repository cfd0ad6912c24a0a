"""Read the weights of a GGUF file (llama.cpp's format) as HF-named float32 tensors.

The ``gguf`` package (llama.cpp's own reader) parses the file and dequantizes
each tensor; this module maps llama.cpp's tensor names to the HF checkpoint
keys our models use, and undoes the row order llama.cpp's converter gives the
q/k projections of ``llama`` models. Config, tokenizer and chat template come
from ``engine.gguf_metadata``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from gguf import GGUFReader

# Tensor types whose dequantization (gguf's reference code) we load; any other
# type is refused by name before anything is read.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

# GGUF architectures whose tensors map onto our Llama-family models.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; it may not exist)."""
    return Path(path).suffix.lower() == ".gguf"


def open_gguf(path: str | Path) -> GGUFReader:
    """A reader over ``path``, refused with a ValueError when it cannot serve our models."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model: no GGUF file at {path}")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"model: {path} is not a readable GGUF file: {error}") from error
    architecture = read_field(reader, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"model: GGUF architecture {architecture!r} in {path.name} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    check_tensors(reader, path.name)
    return reader


def read_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def check_tensors(reader: GGUFReader, file_name: str) -> None:
    """Refuse unsupported tensor types (each named, with a tensor that has it) and
    tensors we do not know how to load."""
    unsupported: dict[str, str] = {}
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        if type_name not in SUPPORTED_TYPES:
            unsupported.setdefault(type_name, tensor.name)
        if tensor.name == "rope_freqs.weight":
            raise ValueError(
                f"model: {file_name} has per-dimension RoPE frequency factors (rope_freqs, "
                "as Llama 3.1 GGUFs do); pd-serve does not load those yet"
            )
        hf_name(tensor.name)
    if unsupported:
        found = ", ".join(f"{t} (e.g. {name})" for t, name in unsupported.items())
        raise ValueError(
            f"model: {file_name} holds tensor types pd-serve cannot load: {found}; "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )


def hf_name(gguf_name: str) -> str:
    """The HF checkpoint key of a llama.cpp tensor name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and kind == "weight":
        return f"{_GLOBAL_NAMES[stem]}.weight"
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in _BLOCK_NAMES:
        raise ValueError(f"model: GGUF tensor {gguf_name!r} has no counterpart in our models")
    return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.{match[3]}"


def iterate_gguf(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the file, dequantized one at a time."""
    import torch
    from gguf import dequantize

    reader = open_gguf(path)
    architecture = read_field(reader, "general.architecture")
    num_heads = _head_count(reader, f"{architecture}.attention.head_count")
    num_kv_heads = _head_count(reader, f"{architecture}.attention.head_count_kv", num_heads)
    for tensor in reader.tensors:
        # Shape note: float32, rows first ((out, in) for a projection), as HF has them.
        array = dequantize(tensor.data, tensor.tensor_type)
        # F32 data is a read-only view of the file's memory map: copied, not shared.
        weight = torch.from_numpy(array if array.flags.writeable else array.copy())
        if architecture == "llama" and ".attn_q." in tensor.name:
            weight = unpermute_rotary_rows(weight, num_heads)
        elif architecture == "llama" and ".attn_k." in tensor.name:
            weight = unpermute_rotary_rows(weight, num_kv_heads)
        yield hf_name(tensor.name), weight


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: HF's rotary embedding pairs dimension i with
    i + head_dim/2 of a head; llama.cpp's pairs 2i with 2i+1, so its converter
    interleaves the two halves of each head's rows. Per head::

        gguf rows: [x0, y0, x1, y1, ...]  ->  HF rows: [x0, x1, ..., y0, y1, ...]

    ``weight``: (num_heads * head_dim, ...) rows, a weight or a bias.
    """
    rows, rest = weight.shape[0], weight.shape[1:]
    half = rows // num_heads // 2
    # (heads, half, 2, ...) -> (heads, 2, half, ...)
    return weight.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _head_count(reader: GGUFReader, key: str, default: int | None = None) -> int:
    value = read_field(reader, key, default)
    if isinstance(value, list):
        raise ValueError(f"model: GGUF {key} differs per layer; pd-serve does not load that")
    if value is None:
        raise ValueError(f"model: GGUF metadata lacks {key}")
    return int(value)
