"""Incremental detokenization: token ids in, text deltas out, O(window) per step."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded in front of the first output token, so that decoders which
# drop a leading space on the first token of a sequence (SentencePiece "▁") keep it.
_NUM_CONTEXT_TOKENS = 5
# Once the window is this long and fully emitted, it is cut back to its last
# _NUM_CONTEXT_TOKENS tokens; this bounds the cost of one step.
_MAX_WINDOW_TOKENS = 16
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas.

    Each step decodes only a short window of recent tokens. The window's text is
    split at ``_num_emitted_chars``: what lies before was already emitted (or is
    prompt context), what lies after is new. A trailing run of U+FFFD is held back
    because it may be a multi-byte character whose remaining bytes are still to
    come; it is released by the next token that completes it, or by ``flush()``.

    Invariant: ``decode(window)[:_num_emitted_chars]`` never changes when tokens
    are appended, because only text before a trailing incomplete character is
    emitted and UTF-8 decoding is final up to that point. Hence ``text`` (after
    ``flush()``) equals ``tokenizer.decode(token_ids, skip_special_tokens=...)``
    whenever the prompt context decodes to whole characters; a context that ends
    mid-character is dropped for that reason.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._window: list[int] = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        context_text = self._decode(self._window)
        if context_text.endswith(_REPLACEMENT_CHAR):
            self._window = []
            context_text = ""
        self._num_emitted_chars = len(context_text)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Appends ``token_ids`` and returns the newly complete text (maybe "")."""
        if not token_ids:
            return ""
        self.token_ids.extend(token_ids)
        self._window.extend(token_ids)
        window_text = self._decode(self._window)
        stable_len = len(window_text.rstrip(_REPLACEMENT_CHAR))
        if stable_len <= self._num_emitted_chars:
            return ""
        delta = window_text[self._num_emitted_chars : stable_len]
        self._num_emitted_chars = stable_len
        self.text += delta
        if stable_len == len(window_text) and len(self._window) > _MAX_WINDOW_TOKENS:
            self._shrink_window()
        return delta

    def flush(self) -> str:
        """Returns all text not emitted yet, trailing incomplete characters included."""
        window_text = self._decode(self._window)
        delta = window_text[self._num_emitted_chars :]
        self._num_emitted_chars = len(window_text)
        self.text += delta
        return delta

    def _shrink_window(self) -> None:
        # NOTE: only called when the whole window text is emitted and ends on a
        # character boundary, so the kept tail's text is emitted in full as well.
        del self._window[:-_NUM_CONTEXT_TOKENS]
        self._num_emitted_chars = len(self._decode(self._window))

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return fast_decode(self._tokenizer, token_ids, self._skip_special_tokens)


def fast_decode(
    tokenizer: PreTrainedTokenizerBase, token_ids: list[int], skip_special_tokens: bool
) -> str:
    """``tokenizer.decode`` through the Rust backend when that gives the same text.

    NOTE: the Python wrapper costs more than the decode itself on short windows;
    it only adds work when ``clean_up_tokenization_spaces`` is set.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
    return backend.decode(token_ids, skip_special_tokens=skip_special_tokens)


def decode_token(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """Text of one token for logprob display (U+FFFD for a partial character)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)
