"""OpenAI API requests and responses, and our token logprobs in OpenAI's two formats.

Requests are as strict as OpenAI's (unknown fields and wrong JSON types are errors).
Range checks mirror ``SamplingParams``, the final judge, so errors can name the field.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from engine.outputs import Logprob, TokenLogprobs
from engine.sampling_params import SamplingParams

MAX_N = 128
# NOTE: JSON has no -inf; OpenAI reports a log-probability too small to show as -9999.0.
MIN_LOGPROB = -9999.0

# Request fields passed on to SamplingParams under the same name; None keeps its default.
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} - {"max_tokens", "logprobs"}
# Fields parsed but not honoured yet, with the values that leave them unused.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "suffix": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


def random_id(prefix: str) -> str:
    """An OpenAI-style object id, e.g. ``cmpl-<32 hex digits>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


class OpenAIRequest(BaseModel):
    """Base of request models: unknown fields, coercions and NaN/inf are rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(OpenAIRequest):
    include_usage: bool | None = False


class _SamplingRequest(OpenAIRequest):
    """Fields that completions and chat share; None means the OpenAI default."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extras, as vLLM names them.
    top_k: int | None = Field(default=None, ge=-1, lt=2**31)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @field_validator("stream_options")
    @classmethod
    def _needs_stream(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value

    @field_validator(*_UNSUPPORTED, check_fields=False)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        shown = value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value
        if shown not in _UNSUPPORTED[info.field_name]:
            raise ValueError(f"{shown!r:.80} is not supported yet")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        kwargs = self.model_dump(include=_SAMPLING_FIELDS, exclude_none=True)
        return SamplingParams(**kwargs, max_tokens=max_tokens, logprobs=logprobs)


def _is_token_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int and t >= 0 for t in value)


def _is_prompt(value: object) -> bool:
    if isinstance(value, str):
        return bool(value)
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(p, str) and p for p in value):
        return True
    return _is_token_ids(value) or all(_is_token_ids(p) for p in value)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: object) -> object:
        if value == "" or value == []:
            raise ValueError("must not be empty")
        if not _is_prompt(value):
            raise ValueError(
                "must be a non-empty string, a list of non-empty strings, "
                "a list of token ids (integers >= 0), or a list of such lists"
            )
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = _or(info.data.get("n"), 1)
        if value is not None and value != n:
            raise ValueError(f"best_of != n is not supported yet (best_of={value}, n={n})")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts: each a string or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [cast(str | list[int], self.prompt)]
        return list(cast(list[str] | list[list[int]], self.prompt))

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """``default_max_tokens`` (room left in the context) applies when max_tokens is null."""
        return self._sampling_params(_or(self.max_tokens, default_max_tokens), self.logprobs)


class TextContentPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIRequest):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextContentPart]
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: object) -> object:
        for part in value if isinstance(value, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise ValueError(
                    f"content parts of type {kind!r} are not supported: "
                    "this server takes text input only"
                )
        return value

    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content


class ResponseFormat(OpenAIRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("requires logprobs to be true")
        return value

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them (``developer`` becomes ``system``)."""
        return [
            {
                "role": "system" if message.role == "developer" else message.role,
                "content": message.text(),
                **message.model_dump(include={"name", "tool_call_id"}, exclude_none=True),
            }
            for message in self.messages
        ]

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """max_completion_tokens wins over max_tokens; with neither, ``default_max_tokens``."""
        max_tokens = _or(self.max_completion_tokens, _or(self.max_tokens, default_max_tokens))
        logprobs = _or(self.top_logprobs, 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, num_prompt_tokens: int, num_completion_tokens: int) -> UsageInfo:
        total = num_prompt_tokens + num_completion_tokens
        return cls(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_completion_tokens,
            total_tokens=total,
        )


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class _Choice(BaseModel):
    index: int
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: int | str | None = None  # the stop string or token id that ended it


class CompletionResponseChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk; the last one may carry only usage, with no choices."""

    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionResponseChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class ChatCompletionStreamChoice(_Choice):
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pd-serve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


def _reported(logprob: Logprob) -> float:
    value = logprob.logprob
    return value if value >= MIN_LOGPROB else MIN_LOGPROB  # also maps NaN


def _text(logprob: Logprob) -> str:
    return logprob.decoded_token or ""


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprobs],
    num_top: int,
    initial_text_offset: int = 0,
) -> CompletionLogprobs:
    """Completions format; top_logprobs: the ``num_top`` most likely and the chosen token.
    ``initial_text_offset``: length of the text before (earlier chunks, echoed prompt)."""
    result = CompletionLogprobs()
    offset = initial_text_offset
    for token_id, entries in zip(token_ids, logprobs, strict=True):
        chosen = entries[token_id]
        result.tokens.append(_text(chosen))
        result.token_logprobs.append(_reported(chosen))
        result.text_offset.append(offset)
        offset += len(_text(chosen))
        top: dict[str, float] = {}
        for other_id, entry in sorted(entries.items(), key=lambda item: item[1].rank):
            if entry.rank <= num_top or other_id == token_id:
                top.setdefault(_text(entry), _reported(entry))
        result.top_logprobs.append(top)
    return result


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], num_top: int
) -> ChatChoiceLogprobs:
    """Chat format: per token its logprob, UTF-8 bytes and the ``num_top`` most likely."""
    content = []
    for token_id, entries in zip(token_ids, logprobs, strict=True):
        ranked = sorted(entries.values(), key=lambda entry: entry.rank)
        top = [_chat_top(entry) for entry in ranked[:num_top] if entry.rank <= num_top]
        chosen = _chat_top(entries[token_id])
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChatChoiceLogprobs(content=content)


def _chat_top(logprob: Logprob) -> ChatTopLogprob:
    token = _text(logprob)
    return ChatTopLogprob(token=token, logprob=_reported(logprob), bytes=list(token.encode()))
