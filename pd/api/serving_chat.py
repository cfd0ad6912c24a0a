"""``POST /v1/chat/completions``: the chat template, then one engine request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.outputs import CompletionOutput, RequestOutput
from engine.tokenizer import render_chat
from pd.api.errors import APIError
from pd.api.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    DeltaMessage,
    UsageInfo,
    chat_logprobs,
)
from pd.api.serving_common import (
    check_lengths,
    check_request_tokens,
    open_request,
    outputs,
    room_left,
    sampling_params,
    sse,
    tokenize,
    unless_disconnected,
)
from pd.api.state import ServerState


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, raw: Request, route: object | None = None
) -> Response:
    try:
        # Off the event loop: a long conversation takes a while to render.
        text = await asyncio.to_thread(
            lambda: render_chat(state.tokenizer, body.template_messages())
        )
    except ValueError as error:
        raise APIError(400, str(error), param="messages") from error
    token_ids = await tokenize(state, text, "messages", add_special_tokens=False)
    max_tokens = body.max_completion_tokens or body.max_tokens
    check_request_tokens(state, max_tokens, body.n or 1)
    check_lengths(state, len(token_ids), max_tokens, "messages")
    default = room_left(state, len(token_ids), body.n or 1)
    params = sampling_params(body.to_sampling_params, default)
    await state.engine.wait_dispatchable()  # type: ignore[union-attr]
    request = open_request(state, text, token_ids, params, body.stream, route)
    if body.stream:
        events = _stream(body, len(token_ids), outputs(request))
        return StreamingResponse(sse(events), media_type="text/event-stream")
    try:
        complete = _complete(body, len(token_ids), outputs(request))
        response = await unless_disconnected(raw, complete)
    finally:
        await request.aclose()
    return JSONResponse(response.model_dump())


def _logprobs(body: ChatCompletionRequest, completion: CompletionOutput):
    if not body.logprobs or completion.logprobs is None:
        return None
    return chat_logprobs(completion.token_ids, completion.logprobs, body.top_logprobs or 0)


async def _complete(
    body: ChatCompletionRequest,
    num_prompt_tokens: int,
    results: AsyncIterator[RequestOutput],
) -> ChatCompletionResponse:
    final = None
    async for output in results:
        final = output
    assert final is not None and final.finished
    choices = [
        ChatCompletionResponseChoice(
            index=completion.index,
            message=AssistantMessage(content=completion.text),
            logprobs=_logprobs(body, completion),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
        for completion in final.outputs
    ]
    num_completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    return ChatCompletionResponse(
        model=body.model,
        choices=choices,
        usage=UsageInfo.of(num_prompt_tokens, num_completion_tokens),
    )


async def _stream(
    body: ChatCompletionRequest,
    num_prompt_tokens: int,
    results: AsyncIterator[RequestOutput],
) -> AsyncIterator[ChatCompletionChunk]:
    response_id = ChatCompletionChunk(model=body.model, choices=[]).id

    def chunk(choices: list[ChatCompletionStreamChoice], usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=response_id, model=body.model, choices=choices, usage=usage)

    # OpenAI opens each choice with the assistant role and empty content.
    yield chunk(
        [
            ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
            for i in range(body.n or 1)
        ]
    )
    num_completion_tokens = 0
    async for output in results:
        for completion in output.outputs:
            num_completion_tokens += len(completion.token_ids)
            logprobs = _logprobs(body, completion)
            if not (completion.text or logprobs or completion.finish_reason):
                continue  # a partial character held back: nothing to say yet
            choice = ChatCompletionStreamChoice(
                index=completion.index,
                delta=DeltaMessage(content=completion.text),
                logprobs=logprobs,
                finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason,
            )
            yield chunk([choice])
    if body.include_usage:
        yield chunk([], UsageInfo.of(num_prompt_tokens, num_completion_tokens))
