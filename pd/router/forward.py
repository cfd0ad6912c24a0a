"""Forward one request to one instance and relay its answer unchanged.

- The instance is never reached (connection refused, connect timeout):
  ``InstanceUnreachable``; nothing was sent, so the router may try another.
- It answers: its status, content type and body go back as they are; a stream goes
  back event by event, as the events arrive.
- It fails while answering (killed, connection reset): a non-streamed request gets a
  502 error; a stream, whose status line has gone out, ends with an error event (the
  shape pd-serve itself sends mid-stream) and ``[DONE]``. Such a request is not retried:
  the instance may have run part of it.
- The client goes away: the upstream stream is closed, which the instance sees as a
  disconnect and aborts the request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pd.api.errors import APIError
from pd.api.serving_common import unless_disconnected

# (outcome) -> None, called once when the request has ended; outcome as in RouterMetrics
OnDone = Callable[[str], None]


class InstanceUnreachable(Exception):
    """The request never reached the instance."""


async def open_upstream(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    """Send the request and wait for the status line; InstanceUnreachable when no
    connection could be made."""
    request = client.build_request("POST", url, content=body, headers=headers)
    try:
        return await client.send(request, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        raise InstanceUnreachable(str(error) or type(error).__name__) from error


async def relay(upstream: httpx.Response, instance: str, raw: Request, on_done: OnDone) -> Response:
    """The response to send back for ``upstream`` (already past its status line);
    ``on_done`` hears how it ended."""
    content_type = upstream.headers.get("content-type", "application/json")
    answer = _Answer(upstream, on_done, "ok" if upstream.status_code < 400 else "error_status")
    if upstream.status_code == 200 and content_type.startswith("text/event-stream"):
        return _EventStream(answer, _relay_events(answer, instance), media_type=content_type)
    try:
        body = await unless_disconnected(raw, upstream.aread())
    except httpx.HTTPError as error:
        answer.outcome = "broken"
        raise APIError(502, _failed_message(instance, error), type="server_error",
                       code="instance_failed") from error  # fmt: skip
    except APIError:  # the client went away
        answer.outcome = "aborted"
        raise
    finally:
        await answer.close()
    return Response(body, status_code=upstream.status_code, media_type=content_type)


class _Answer:
    """An instance's answer being relayed; closed once, whichever way it ends."""

    def __init__(self, upstream: httpx.Response, on_done: OnDone, outcome: str):
        self.upstream = upstream
        self.on_done = on_done
        self.outcome = outcome
        self.is_closed = False

    async def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        try:
            await self.upstream.aclose()
        finally:
            self.on_done(self.outcome)


class _EventStream(StreamingResponse):
    """Closes the answer however the response ends, even when the client leaves before
    the first event (the event generator then never runs, nor its ``finally``)."""

    def __init__(self, answer: _Answer, events: AsyncIterator[bytes], media_type: str):
        super().__init__(events, media_type=media_type)
        self.answer = answer

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.answer.is_closed:  # the client left: the request is aborted
                self.answer.outcome = "aborted"
                await self.answer.close()


async def _relay_events(answer: _Answer, instance: str) -> AsyncIterator[bytes]:
    """The instance's server-sent events, whole ones only: a stream cut mid-event ends
    after the last complete event with an error event instead of a torn line."""
    pending = b""
    try:
        async for chunk in answer.upstream.aiter_raw():
            pending += chunk
            end = pending.rfind(b"\n\n")
            if end >= 0:
                yield pending[: end + 2]
                pending = pending[end + 2 :]
        if pending:
            yield pending
    except httpx.HTTPError as error:
        answer.outcome = "broken"
        body = {"error": {"message": _failed_message(instance, error), "type": "server_error",
                          "code": "instance_failed"}}  # fmt: skip
        yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
    except (asyncio.CancelledError, GeneratorExit):
        answer.outcome = "aborted"  # the client left
        raise
    finally:
        # NOTE: closing the upstream stream makes the instance abort the request when the
        # client left before the end.
        await answer.close()


def _failed_message(instance: str, error: Exception) -> str:
    reason = str(error) or type(error).__name__
    return f"the instance {instance} failed while answering: {reason}"
