"""Tiny GGUF files for tests, written from the tiny HF models as llama.cpp's converter
writes them: llama.cpp's tensor names (from gguf's own name map), q/k rows of
``llama`` models permuted for its rotary layout, 2-D tensors in the chosen type
and 1-D ones (norms, biases) in F32, the tokenizer as gpt2-style BPE metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

_PRE_TOKENIZERS = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}


def write_gguf(
    hf_dir: Path, out: Path, tensor_type: str = "F32", types: dict[str, str] | None = None
) -> Path:
    """``hf_dir`` (a tiny model) as the GGUF file ``out``; ``types`` overrides the type
    of single tensors by GGUF name (any type, even ones gguf cannot quantize: those
    get all-zero blocks)."""
    config = json.loads((hf_dir / "config.json").read_text())
    arch = config["model_type"]
    writer = gguf.GGUFWriter(str(out), arch)
    _write_config(writer, config)
    _write_tokenizer(writer, hf_dir, arch)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    for name, tensor in load_file(str(hf_dir / "model.safetensors")).items():
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        array = _llama_cpp_rows(config, gguf_name, tensor.to(torch.float32)).numpy()
        qtype = "F32" if array.ndim == 1 else (types or {}).get(gguf_name, tensor_type)
        _add_tensor(writer, gguf_name, array, gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def permute_for_llama_cpp(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter's row order: each head's rows split in halves, interleaved."""
    rows, rest = weight.shape[0], weight.shape[1:]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *rest)
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _llama_cpp_rows(config: dict, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    if config["model_type"] != "llama":
        return tensor
    if ".attn_q." in gguf_name:
        return permute_for_llama_cpp(tensor, config["num_attention_heads"])
    if ".attn_k." in gguf_name:
        return permute_for_llama_cpp(tensor, config["num_key_value_heads"])
    return tensor


def _add_tensor(
    writer: gguf.GGUFWriter, name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType
) -> None:
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array)
        return
    try:
        data = gguf.quants.quantize(array, qtype)
    except NotImplementedError:
        data = np.zeros(gguf.quants.quant_shape_to_byte_shape(array.shape, qtype), np.uint8)
    writer.add_tensor(name, data, raw_dtype=qtype)


def _write_config(writer: gguf.GGUFWriter, config: dict) -> None:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_name("tiny")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])


def _write_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, arch: str) -> None:
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    vocab.update({t["content"]: t["id"] for t in spec["added_tokens"]})
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZERS[arch])
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(generation["bos_token_id"])
    writer.add_eos_token_id(generation["eos_token_id"][0])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer_config["chat_template"])


def write_bare_gguf(out: Path, arch: str, tensors: dict[str, tuple[tuple[int, int], str]]) -> Path:
    """A GGUF file with head counts for metadata and ``tensors`` (name -> ((rows, cols),
    type)) of all-zero blocks: enough for the weight reader, not for a model."""
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    for name, (shape, type_name) in tensors.items():
        qtype = gguf.GGMLQuantizationType[type_name]
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor(name, np.zeros(byte_shape, np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
