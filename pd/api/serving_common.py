"""What the completion and chat handlers share: prompt checks, running a request
against the engine, server-sent events, and aborting when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from pd.api.errors import APIError
from pd.api.state import ServerState
from pd.engine_client import (
    ClusterUnavailable,
    EngineDeadError,
    EngineOverloaded,
    RequestFailed,
    RequestRejected,
    RequestStream,
)

T = TypeVar("T")
_DISCONNECT_POLL_S = 0.25


def check_lengths(
    state: ServerState, num_prompt_tokens: int, max_tokens: int | None, prompt_param: str
) -> None:
    """OpenAI's rule: prompt plus requested completion must fit the context."""
    limit = state.max_model_len
    if num_prompt_tokens >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens; the prompt has "
            f"{num_prompt_tokens} tokens, which leaves no room for a completion.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion). Reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )


async def tokenize(state: ServerState, text: str, prompt_param: str, **kwargs) -> list[int]:
    """Token ids of ``text``, computed off the event loop; a text too long to fit
    ``max_model_len`` whatever its tokens is refused without tokenizing it."""
    limit = state.max_model_len * state.max_chars_per_token
    if len(text) > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {state.max_model_len} tokens; the prompt "
            f"has {len(text)} characters, more than {state.max_model_len} tokens can hold.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    return await asyncio.to_thread(state.tokenizer.encode, text, **kwargs)


def room_left(state: ServerState, num_prompt_tokens: int, num_sequences: int = 1) -> int:
    """The default max_tokens: the room left in the context, capped by this sequence's
    share of ``--max-request-tokens`` (``num_sequences``: choices x prompts)."""
    share = state.args.max_request_tokens // max(num_sequences, 1)
    return max(1, min(state.max_model_len - num_prompt_tokens, share))


def check_request_tokens(state: ServerState, max_tokens: int | None, num_sequences: int) -> None:
    """``n * max_tokens`` (times the prompts of a completions batch) within the limit."""
    limit = state.args.max_request_tokens
    if num_sequences > limit:
        raise APIError(
            400, f"a request may generate at most {limit} tokens; it asks for "
            f"{num_sequences} sequences", param="n",
        )  # fmt: skip
    if max_tokens is not None and max_tokens * num_sequences > limit:
        raise APIError(
            400,
            f"a request may generate at most {limit} tokens (--max-request-tokens); "
            f"max_tokens {max_tokens} for {num_sequences} sequences asks for "
            f"{max_tokens * num_sequences}",
            param="max_tokens",
        )


def sampling_params(
    build: Callable[[int], SamplingParams], default_max_tokens: int
) -> SamplingParams:
    try:
        return build(default_max_tokens)
    except ValueError as error:
        raise APIError(400, str(error)) from error


def open_request(
    state: ServerState,
    prompt: str | None,
    prompt_token_ids: list[int],
    params: SamplingParams,
    stream: bool,
    route: object | None = None,
) -> RequestStream:
    """Submit a request now (synchronously, so the waiting bound holds exactly)."""
    assert state.engine is not None
    try:
        return state.engine.open(
            prompt, prompt_token_ids, params, stream, state.args.max_waiting_requests, route
        )
    except EngineOverloaded as error:
        raise APIError(
            503, f"{error}; retry shortly", type="overloaded_error", headers={"Retry-After": "1"}
        ) from error
    except EngineDeadError as error:
        raise APIError(503, f"engine unavailable: {error}", type="server_error") from error
    except ClusterUnavailable as error:
        raise APIError(
            503, f"cluster unavailable: {error}", type="server_error", headers={"Retry-After": "1"}
        ) from error


async def outputs(stream: RequestStream) -> AsyncIterator[RequestOutput]:
    """A request's outputs with engine failures as API errors; closing releases it."""
    try:
        async for output in stream:
            yield output
    except RequestRejected as error:
        raise APIError(400, str(error)) from error
    except EngineDeadError as error:
        raise APIError(503, f"engine unavailable: {error}", type="server_error") from error
    except RequestFailed as error:
        raise APIError(503, f"request failed: {error}", type="server_error") from error
    finally:
        await stream.aclose()


async def merge(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as their items arrive: (source index, item)."""
    if len(iterators) == 1:
        async with contextlib.aclosing(iterators[0]):
            async for item in iterators[0]:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(iterator):
                async for item in iterator:
                    await queue.put((index, item))
            await queue.put((index, done))
        except BaseException as error:
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# Characters JSON leaves unescaped but str.splitlines() (and so many SSE
# clients' line readers) treats as line breaks; escaped, a data line stays one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


async def sse(events: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events, ending with ``[DONE]``; an error mid-stream becomes an
    error event (the status line has already gone out)."""
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                yield f"data: {event.model_dump_json().translate(_LINE_BREAKS)}\n\n"
        except APIError as error:
            body = {"error": {"message": error.message, "type": error.type, "code": error.code}}
            yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes away first, cancel it (which aborts its
    requests in the engine) and raise."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "client closed the request", type="invalid_request_error")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
