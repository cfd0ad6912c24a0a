"""GGUF weights: llama.cpp's names and q/k row order mapped back to the HF checkpoint,
every supported tensor type dequantized, anything else refused by name."""

from __future__ import annotations

import pytest
import torch

from engine.gguf_loader import SUPPORTED_TYPES, iterate_gguf, unpermute_rotary_rows
from engine.weight_loader import iterate_checkpoint
from tests.engine.gguf_files import permute_for_llama_cpp, write_bare_gguf

# Largest error of a dequantized weight, as a fraction of the tensor's largest magnitude:
# about one quantization step (rows out of order would be off by the weights' own size).
TOLERANCES = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q5_0": 7e-2, "Q5_1": 7e-2,
              "Q4_0": 0.14, "Q4_1": 0.14}  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_file_yields_the_hf_checkpoint_exactly(tiny_model, tiny_gguf, arch):
    expected = dict(iterate_checkpoint(tiny_model(arch)))
    got = dict(iterate_gguf(tiny_gguf(arch)))
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("tensor_type", list(TOLERANCES))
def test_quantized_weights_are_close_to_the_originals(tiny_model, tiny_gguf, tensor_type):
    expected = dict(iterate_checkpoint(tiny_model("llama")))
    got = dict(iterate_gguf(tiny_gguf("llama", tensor_type)))
    for name, tensor in got.items():
        reference = expected[name]
        error = (tensor - reference).abs().max() / reference.abs().max()
        assert error <= TOLERANCES[tensor_type], (name, float(error))


def test_unpermute_inverts_llama_cpp_row_order():
    weight = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)
    permuted = permute_for_llama_cpp(weight, num_heads=2)
    # head 0 holds rows 0..7 (halves 0..3 and 4..7), interleaved by llama.cpp
    assert permuted[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
    assert torch.equal(unpermute_rotary_rows(permuted, 2), weight)
    bias = torch.arange(16.0)
    assert torch.equal(unpermute_rotary_rows(permute_for_llama_cpp(bias, 4), 4), bias)


@pytest.mark.parametrize("tensor_type", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_are_read_in_their_row_shape(tmp_path, tensor_type):
    path = write_bare_gguf(
        tmp_path / "k.gguf", "llama", {"blk.0.ffn_up.weight": ((3, 512), tensor_type)}
    )
    ((name, tensor),) = iterate_gguf(path)
    assert name == "model.layers.0.mlp.up_proj.weight"
    assert tensor.shape == (3, 512) and tensor.dtype == torch.float32


def test_unsupported_types_are_refused_by_name(tiny_gguf):
    path = tiny_gguf("llama", types={"blk.1.attn_v.weight": "IQ4_NL"})
    with pytest.raises(ValueError, match=r"IQ4_NL \(e\.g\. blk\.1\.attn_v\.weight\)") as error:
        next(iterate_gguf(path))
    assert ", ".join(SUPPORTED_TYPES) in str(error.value)


def test_unknown_tensors_architectures_and_missing_files_are_refused(tmp_path):
    stray = write_bare_gguf(
        tmp_path / "s.gguf", "llama", {"blk.0.mystery.weight": ((2, 32), "F32")}
    )
    with pytest.raises(ValueError, match=r"'blk\.0\.mystery\.weight' has no counterpart"):
        next(iterate_gguf(stray))
    phi = write_bare_gguf(tmp_path / "p.gguf", "phi3", {"output.weight": ((2, 32), "F32")})
    with pytest.raises(ValueError, match=r"architecture 'phi3' .* not supported"):
        next(iterate_gguf(phi))
    with pytest.raises(ValueError, match="no GGUF file"):
        next(iterate_gguf(tmp_path / "absent.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        next(iterate_gguf(tmp_path / "junk.gguf"))
