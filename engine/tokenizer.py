"""Tokenizer loading from a local HF folder (tokenizer.json + tokenizer_config.json) or
a GGUF file (through its converted folder, ``engine.gguf_metadata``)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.gguf_metadata import model_folder


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    folder = model_folder(path)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise ValueError(f"tokenizer: no tokenizer.json in {folder}")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> str:
    """``messages`` rendered with the chat template, as text."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; pass chat_template")
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> tuple[str, list[int]]:
    """Render ``messages`` with the chat template; returns (text, token ids).

    The template itself adds any bos token, so encoding adds no special tokens.
    """
    text = render_chat(tokenizer, messages, add_generation_prompt, chat_template)
    return text, tokenizer.encode(text, add_special_tokens=False)
