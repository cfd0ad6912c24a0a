"""A GGUF file's config, tokenizer and chat template, converted once into a cached HF
folder keyed by the file's content, safely when processes convert at the same time."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import engine.gguf_metadata as gguf_metadata
from engine.config import ModelConfig
from engine.gguf_metadata import SOURCE_FILE, converted_folder, model_folder
from engine.tokenizer import encode_chat, load_tokenizer
from tests.engine.gguf_convert_child import convert_in_child

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_folder_holds_config_tokenizer_and_chat_template(tiny_model, tiny_gguf, tmp_path):
    gguf_file = tiny_gguf("qwen3")
    folder = converted_folder(gguf_file, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["head_dim"] == 32  # not hidden_size / heads (16), nor Qwen3Config's 128
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source["file"] == str(gguf_file.resolve()) and folder.name == source["sha256"]
    tokenizer = load_tokenizer(folder)
    direct = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert tokenizer.chat_template == direct.chat_template
    text, ids = encode_chat(tokenizer, MESSAGES)
    assert "<|im_start|>user\nWhat is the capital" in text
    assert text == direct.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert ids == direct.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_model_config_of_a_gguf_file_equals_the_hf_folders(tiny_model, tiny_gguf, arch):
    gguf_file = tiny_gguf(arch)
    from_gguf = ModelConfig.from_pretrained(gguf_file)
    from_hf = ModelConfig.from_pretrained(tiny_model(arch))
    assert from_gguf.path == str(gguf_file)  # the weights are read from the GGUF file
    differ = {
        name: (getattr(from_gguf, name), getattr(from_hf, name))
        for name in from_hf.__dataclass_fields__
        if getattr(from_gguf, name) != getattr(from_hf, name)
    }
    assert differ.pop("path")
    # GGUF stores the epsilon as float32 and names one eos token (HF's folder has two)
    assert differ.pop("rms_norm_eps") == pytest.approx((1e-6, 1e-6))
    assert differ.pop("eos_token_ids")[0] == from_hf.eos_token_ids[:1]
    assert differ == {}


def test_tensor_type_sets_the_auto_dtype(tiny_gguf):
    assert ModelConfig.from_pretrained(tiny_gguf("llama", "BF16")).dtype == torch.bfloat16
    assert ModelConfig.from_pretrained(tiny_gguf("llama", "F16")).dtype == torch.float16
    assert ModelConfig.from_pretrained(tiny_gguf("llama", "Q4_1")).dtype == torch.float32


def test_converted_once_per_content(tiny_gguf, tmp_path, monkeypatch):
    calls = _count_conversions(monkeypatch)
    gguf_file = tiny_gguf("llama")
    folder = converted_folder(gguf_file, tmp_path)
    assert converted_folder(gguf_file, tmp_path) == folder
    moved = shutil.copy(gguf_file, tmp_path / "renamed.gguf")
    assert converted_folder(moved, tmp_path) == folder  # keyed by content, not by name
    assert len(calls) == 1
    assert converted_folder(tiny_gguf("llama", "Q8_0"), tmp_path) != folder
    assert len(calls) == 2
    assert model_folder(folder) == folder  # an HF folder is its own


def test_unsupported_file_is_refused_and_leaves_no_folder(tiny_gguf, tmp_path):
    bad = tiny_gguf("llama", types={"blk.0.ffn_up.weight": "IQ4_NL"})
    with pytest.raises(ValueError, match="IQ4_NL"):
        converted_folder(bad, tmp_path)
    assert [p.name for p in (tmp_path / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_failed_or_killed_conversion_leaves_nothing_half_done(tiny_gguf, tmp_path, monkeypatch):
    gguf_file = tiny_gguf("llama")
    digest = gguf_metadata.file_sha256(gguf_file)
    root = tmp_path / "gguf"
    stale = root / f".{digest}.killed"  # a converter killed midway left this behind
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{")

    def fail(source: Path, out_dir: Path, digest: str) -> None:
        (out_dir / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_metadata, "convert_metadata", fail)
    with pytest.raises(OSError, match="disk full"):
        converted_folder(gguf_file, tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [f"{digest}.lock"]
    monkeypatch.undo()
    folder = converted_folder(gguf_file, tmp_path)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


@pytest.mark.slow  # spawns two Python processes
def test_processes_converting_at_once_convert_once(tiny_gguf, tmp_path):
    gguf_file = tiny_gguf("qwen2")
    log = tmp_path / "conversions.log"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    children = [
        context.Process(target=convert_in_child, args=(gguf_file, tmp_path, log, barrier, results))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    folders = {results.get(timeout=120) for _ in children}
    for child in children:
        child.join(10)
        assert child.exitcode == 0
    assert len(folders) == 1
    assert len(log.read_text().split()) == 1  # one process converted, the other waited
    folder = Path(folders.pop())
    assert load_tokenizer(folder).chat_template
    assert [p for p in (tmp_path / "gguf").iterdir() if p.name.startswith(".")] == []


def _count_conversions(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    original = gguf_metadata.convert_metadata

    def counted(source: Path, out_dir: Path, digest: str) -> None:
        calls.append(source)
        original(source, out_dir, digest)

    monkeypatch.setattr(gguf_metadata, "convert_metadata", counted)
    return calls
