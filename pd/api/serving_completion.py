"""``POST /v1/completions``: one engine request per prompt, ``n`` choices each."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.outputs import CompletionOutput
from engine.sampling_params import SamplingParams
from pd.api.errors import APIError
from pd.api.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    UsageInfo,
    completion_logprobs,
)
from pd.api.serving_common import (
    check_lengths,
    check_request_tokens,
    merge,
    open_request,
    outputs,
    room_left,
    sampling_params,
    sse,
    tokenize,
    unless_disconnected,
)
from pd.api.state import ServerState
from pd.engine_client import RequestStream


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


@dataclass
class _Choice:
    """Running state of one choice while streaming."""

    num_tokens: int = 0
    text_offset: int = 0
    sent_echo: bool = False


@dataclass
class _Plan:
    prompts: list[_Prompt]
    request: CompletionRequest
    params: list[SamplingParams] = field(default_factory=list)


async def create_completion(
    state: ServerState, body: CompletionRequest, raw: Request, route: object | None = None
) -> Response:
    if body.echo and body.logprobs is not None:
        raise APIError(
            400, "echo with logprobs is not supported yet (needs prompt logprobs)", param="echo"
        )
    plan = await _plan(state, body)
    await state.engine.wait_dispatchable()  # type: ignore[union-attr]
    requests = _open(state, plan, body.stream, route)
    if body.stream:
        events = _stream(state, plan, requests)
        return StreamingResponse(sse(events), media_type="text/event-stream")
    try:
        response = await unless_disconnected(raw, _complete(state, plan, requests))
    finally:
        for request in requests:
            await request.aclose()
    return JSONResponse(response.model_dump())


async def _plan(state: ServerState, body: CompletionRequest) -> _Plan:
    prompts = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            prompts.append(_Prompt(prompt, await tokenize(state, prompt, "prompt")))
        else:
            # The length first: it is cheap, and bounds the vocabulary scan.
            check_lengths(state, len(prompt), body.max_tokens, "prompt")
            _check_vocab(state, prompt)
            prompts.append(_Prompt(None, list(prompt)))
    plan = _Plan(prompts, body)
    num_sequences = len(prompts) * (body.n or 1)
    check_request_tokens(state, body.max_tokens, num_sequences)
    for prompt in prompts:
        check_lengths(state, len(prompt.token_ids), body.max_tokens, "prompt")
        default = room_left(state, len(prompt.token_ids), num_sequences)
        plan.params.append(sampling_params(body.to_sampling_params, default))
    return plan


def _check_vocab(state: ServerState, token_ids: list[int]) -> None:
    vocab_size = len(state.tokenizer)
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(
            400, f"prompt token ids must be in [0, {vocab_size}); got {bad[:5]}", param="prompt"
        )


def _echo_text(state: ServerState, prompt: _Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    return state.tokenizer.decode(prompt.token_ids)


def _open(
    state: ServerState, plan: _Plan, stream: bool, route: object | None
) -> list[RequestStream]:
    """Submit every prompt now; if one is refused, release the others."""
    requests: list[RequestStream] = []
    try:
        for prompt, params in zip(plan.prompts, plan.params, strict=True):
            requests.append(
                open_request(state, prompt.text, prompt.token_ids, params, stream, route)
            )
    except APIError:
        for request in requests:
            request.release()
        raise
    return requests


async def _complete(
    state: ServerState, plan: _Plan, requests: list[RequestStream]
) -> CompletionResponse:
    n = plan.request.n or 1
    choices: list[CompletionResponseChoice] = []
    num_completion_tokens = 0
    async for prompt_index, output in merge([outputs(r) for r in requests]):
        prompt = plan.prompts[prompt_index]
        for completion in output.outputs:
            num_completion_tokens += len(completion.token_ids)
            prefix = _echo_text(state, prompt) if plan.request.echo else ""
            choices.append(
                CompletionResponseChoice(
                    index=prompt_index * n + completion.index,
                    text=prefix + completion.text,
                    logprobs=_logprobs(plan, completion, 0),
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                )
            )
    choices.sort(key=lambda choice: choice.index)
    num_prompt_tokens = sum(len(p.token_ids) for p in plan.prompts)
    return CompletionResponse(
        model=plan.request.model,
        choices=choices,
        usage=UsageInfo.of(num_prompt_tokens, num_completion_tokens),
    )


def _logprobs(plan: _Plan, completion: CompletionOutput, text_offset: int):
    if plan.request.logprobs is None or completion.logprobs is None:
        return None
    return completion_logprobs(
        completion.token_ids, completion.logprobs, plan.request.logprobs, text_offset
    )


async def _stream(
    state: ServerState, plan: _Plan, requests: list[RequestStream]
) -> AsyncIterator[CompletionStreamResponse]:
    n = plan.request.n or 1
    response_id = CompletionStreamResponse(model=plan.request.model, choices=[]).id
    choices: dict[int, _Choice] = {}
    async for prompt_index, output in merge([outputs(r) for r in requests]):
        prompt = plan.prompts[prompt_index]
        for completion in output.outputs:
            index = prompt_index * n + completion.index
            choice = choices.setdefault(index, _Choice())
            text = completion.text
            if plan.request.echo and not choice.sent_echo:
                text, choice.sent_echo = _echo_text(state, prompt) + text, True
            logprobs = _logprobs(plan, completion, choice.text_offset)
            choice.text_offset += len(text)
            choice.num_tokens += len(completion.token_ids)
            if not (text or logprobs or completion.finish_reason):
                continue  # a partial character held back: nothing to say yet
            yield CompletionStreamResponse(
                id=response_id,
                model=plan.request.model,
                choices=[
                    CompletionResponseChoice(
                        index=index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                    )
                ],
            )
    if plan.request.include_usage:
        num_prompt_tokens = sum(len(p.token_ids) for p in plan.prompts)
        num_completion_tokens = sum(c.num_tokens for c in choices.values())
        yield CompletionStreamResponse(
            id=response_id,
            model=plan.request.model,
            choices=[],
            usage=UsageInfo.of(num_prompt_tokens, num_completion_tokens),
        )
