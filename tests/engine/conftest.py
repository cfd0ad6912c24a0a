"""Shared fixtures for engine tests: a tiny byte-level BPE tokenizer built offline, and
the device Triton kernels run on."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Accented letters, CJK and emoji: with a small vocabulary their UTF-8 bytes are
# split across tokens, which is what the detokenizer must cope with.
SAMPLE_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Café au lait, naïve façade, Ærøskøbing, Straße, señor, jalapeño, crème brûlée.",
    "你好，世界！我们正在测试增量解码器。中文字符会被拆成多个字节。",
    "日本語のテキストも少し。こんにちは世界。",
    "Emoji time 😀🎉👍🏽🇫🇷❤️‍🔥 and more 🚀✨🍕.",
    "Mixed: résumé 简历 📄, déjà vu 似曾相识 🔁. STOP here, or END, or ### maybe.",
]


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SAMPLE_TEXTS * 4, trainer)
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """Built, saved and loaded back from a local folder, as the engine loads one."""
    folder: Path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    ).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    return list(SAMPLE_TEXTS)


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the Triton kernel tests run: CUDA where there is a GPU, else the CPU (Triton's
    interpreter, with GPU rounding of bfloat16)."""
    import torch  # NOTE: lazily, as in tests/conftest.py

    if torch.cuda.is_available():
        return "cuda"
    _round_bfloat16_to_nearest_even(monkeypatch)
    return "cpu"


def _round_bfloat16_to_nearest_even(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTE: Triton's interpreter truncates float32 -> bfloat16 casts where GPUs (and
    torch) round to nearest even; rounding as they do lets bf16 results compare exactly."""
    import numpy as np
    import torch
    from triton.runtime import interpreter

    convert = interpreter._convert_float

    def convert_rounding(data, src_type, dst_type, rounding_mode):
        if src_type == interpreter.tl.float32 and dst_type == interpreter.tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(data, np.float32)).bfloat16()
            return rounded.view(torch.int16).numpy().view(np.uint16)
        return convert(data, src_type, dst_type, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert_rounding)
