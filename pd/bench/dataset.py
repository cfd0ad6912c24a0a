"""Seeded random prompts of controlled lengths.

With the served model's tokenizer, completions prompts are lists of token ids,
so their length is exact (the server takes ``prompt: list[int]``), and chat
messages are random words cut to the token length. Without one, prompts are
random words, one per token wanted: a close guess for real tokenizers, where
common words are single tokens. Special tokens never appear in token-id prompts.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
# Common English words: most are one token in real tokenizers.
_WORD_TEXT = """
    the of and to in is that for it as with was on be by at this from have or one
    had not but what all were when we there can an your which their said if will
    each about how up out them then she many some so these would other into has
    more her two like him see time could no make than first been its who now people
    my made over did down only way find use may water long little very after words
    called just where most know cache prefill decode token model batch layer block
"""
WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class BenchPrompt:
    """One request's input. ``prompt_len`` is exact for token ids, else the number
    of words (the server's usage report gives the real count)."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer and its ordinary token ids (no added or special tokens)."""

    tokenizer: Tokenizer
    token_ids: tuple[int, ...]


def load_vocabulary(path: Path) -> Vocabulary:
    """From a folder holding tokenizer.json, or the file itself; ValueError if neither."""
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no {TOKENIZER_FILE} at {path}")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # the tokenizers library raises bare Exceptions
        raise ValueError(f"cannot load the tokenizer {file}: {error}") from error
    added = set(tokenizer.get_added_tokens_decoder())
    ordinary = set(tokenizer.get_vocab(with_added_tokens=False).values()) - added
    if not ordinary:
        raise ValueError(f"the tokenizer {file} has no ordinary tokens")
    return Vocabulary(tokenizer, tuple(sorted(ordinary)))


def default_tokenizer_path(model: str) -> Path | None:
    """The model id as a tokenizer path, when it names a local folder with a tokenizer
    (pd-serve's default served name is the model folder)."""
    path = Path(model)
    return path if (path / TOKENIZER_FILE).is_file() else None


def sample_len(rng: random.Random, mean_len: int, spread: float) -> int:
    """A length uniform over the integers in [L*(1-F), L*(1+F)], at least 1."""
    low = max(1, math.ceil(mean_len * (1.0 - spread)))
    high = max(low, math.floor(mean_len * (1.0 + spread)))
    return rng.randint(low, high)


def random_words(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choices(WORDS, k=num_words))


def words_of_token_len(rng: random.Random, vocabulary: Vocabulary, num_tokens: int) -> str:
    """Random words cut to at most ``num_tokens`` tokens (every word is at least one)."""
    encoding = vocabulary.tokenizer.encode(random_words(rng, num_tokens), add_special_tokens=False)
    return vocabulary.tokenizer.decode(encoding.ids[:num_tokens])


def make_prompts(
    num_prompts: int,
    input_len: int,
    input_len_range: float,
    output_len: int,
    output_len_range: float,
    seed: int,
    vocabulary: Vocabulary | None,
    as_token_ids: bool,
) -> list[BenchPrompt]:
    """The same arguments give the same prompts. ``as_token_ids`` (completions
    only) needs a vocabulary; without one, prompts are words."""
    rng = random.Random(f"{seed}:prompts")
    prompts = []
    for _ in range(num_prompts):
        prompt_len = sample_len(rng, input_len, input_len_range)
        request_output_len = sample_len(rng, output_len, output_len_range)
        prompt: str | list[int]
        if vocabulary is None:
            prompt = random_words(rng, prompt_len)
        elif as_token_ids:
            prompt = rng.choices(vocabulary.token_ids, k=prompt_len)
        else:
            prompt = words_of_token_len(rng, vocabulary, prompt_len)
        prompts.append(BenchPrompt(prompt, prompt_len, request_output_len))
    return prompts
