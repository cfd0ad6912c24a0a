from __future__ import annotations

import random

import pytest
from transformers import PreTrainedTokenizerFast

from engine import detokenizer as detokenizer_module
from engine.detokenizer import IncrementalDetokenizer, decode_token

FFFD = "\ufffd"


def _stream(
    detokenizer: IncrementalDetokenizer, token_ids: list[int], rng: random.Random
) -> list[str]:
    """Feeds ``token_ids`` in random chunks of 1-3 tokens; returns the deltas."""
    deltas = []
    pos = 0
    while pos < len(token_ids):
        step = rng.randint(1, 3)
        deltas.append(detokenizer.add_tokens(token_ids[pos : pos + step]))
        pos += step
    return deltas


def _split_char_tokens(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[int]:
    """Tokens that alone decode to a broken character."""
    ids = {i for text in texts for i in tokenizer.encode(text)}
    return sorted(i for i in ids if FFFD in tokenizer.decode([i]))


def test_tokenizer_splits_multibyte_characters(
    tokenizer: PreTrainedTokenizerFast, sample_texts: list[str]
) -> None:
    assert len(_split_char_tokens(tokenizer, sample_texts)) > 20


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_never_emit_broken_char(
    tokenizer: PreTrainedTokenizerFast, sample_texts: list[str], skip_special_tokens: bool
) -> None:
    rng = random.Random(1234 + skip_special_tokens)
    vocab_size = len(tokenizer)
    num_held = 0
    for _ in range(1500):
        prompt = tokenizer.encode(rng.choice(sample_texts))
        token_ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 24))]
        full_text = tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
        emitted = ""
        for delta in _stream(detokenizer, token_ids, rng):
            assert not delta.endswith(FFFD)
            emitted += delta
            assert full_text.startswith(emitted)
        num_held += emitted != full_text
        tail = detokenizer.flush()
        assert emitted + tail == full_text == detokenizer.text
        assert detokenizer.token_ids == token_ids
    assert num_held > 100  # the hold-back path was exercised


def test_encoded_text_round_trips_token_by_token(
    tokenizer: PreTrainedTokenizerFast, sample_texts: list[str]
) -> None:
    for text in sample_texts:
        detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Prompt: "))
        deltas = [detokenizer.add_tokens([token_id]) for token_id in tokenizer.encode(text)]
        assert "".join(deltas) == text
        assert all(FFFD not in delta for delta in deltas)
        assert detokenizer.flush() == ""


def test_split_character_is_released_whole(tokenizer: PreTrainedTokenizerFast) -> None:
    token_ids = tokenizer.encode("ok 😀")
    assert len(tokenizer.encode("😀")) > 1
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas = [detokenizer.add_tokens([token_id]) for token_id in token_ids]
    assert "".join(deltas) == "ok 😀"
    assert "" in deltas  # held back while the emoji was incomplete
    assert all(FFFD not in delta for delta in deltas)


def test_complete_part_of_a_token_is_emitted_early(
    tokenizer: PreTrainedTokenizerFast, sample_texts: list[str]
) -> None:
    checked = 0
    for token_id in _split_char_tokens(tokenizer, sample_texts):
        head = tokenizer.decode([token_id]).rstrip(FFFD)
        if head and FFFD not in head:
            assert IncrementalDetokenizer(tokenizer, []).add_tokens([token_id]) == head
            checked += 1
    assert checked > 3


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(tokenizer: PreTrainedTokenizerFast, skip_special_tokens: bool) -> None:
    token_ids = tokenizer.encode("<|im_start|>你好<|im_end|>Hello<|endoftext|>")
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens)
    text = "".join(detokenizer.add_tokens([token_id]) for token_id in token_ids)
    text += detokenizer.flush()
    if skip_special_tokens:
        assert text == "你好Hello"
    else:
        assert text == "<|im_start|>你好<|im_end|>Hello<|endoftext|>"


def test_prompt_ending_mid_character(tokenizer: PreTrainedTokenizerFast) -> None:
    emoji_ids = tokenizer.encode("😀")
    prompt = tokenizer.encode("Hi ") + emoji_ids[:1]
    output_ids = emoji_ids[1:] + tokenizer.encode(" there")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detokenizer.add_tokens([token_id]) for token_id in output_ids)
    assert text + detokenizer.flush() == tokenizer.decode(output_ids)


def test_decode_window_stays_small(
    tokenizer: PreTrainedTokenizerFast, sample_texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token_ids = tokenizer.encode(" ".join(sample_texts) * 20)
    assert len(token_ids) > 3000
    window_lens: list[int] = []
    decode = detokenizer_module.fast_decode

    def recording_decode(tok: PreTrainedTokenizerFast, ids: list[int], skip: bool) -> str:
        window_lens.append(len(ids))
        return decode(tok, ids, skip)

    monkeypatch.setattr(detokenizer_module, "fast_decode", recording_decode)
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detokenizer.add_tokens([token_id]) for token_id in token_ids)
    monkeypatch.undo()
    assert text == tokenizer.decode(token_ids)
    assert max(window_lens) <= 24
    assert len(window_lens) < 1.2 * len(token_ids)


def test_empty_add_and_flush(tokenizer: PreTrainedTokenizerFast) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("abc"))
    assert detokenizer.add_tokens([]) == ""
    assert detokenizer.flush() == ""
    assert detokenizer.text == ""
    assert detokenizer.token_ids == []


def test_decode_token(tokenizer: PreTrainedTokenizerFast) -> None:
    hello = tokenizer.encode("Hello")
    assert "".join(decode_token(tokenizer, token_id) for token_id in hello) == "Hello"
    assert decode_token(tokenizer, tokenizer.eos_token_id) == "<|endoftext|>"
    partial = tokenizer.encode("😀")[0]
    assert FFFD in decode_token(tokenizer, partial)
