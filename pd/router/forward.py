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
    outcome = "ok" if upstream.status_code < 400 else "error_status"
    if upstream.status_code == 200 and content_type.startswith("text/event-stream"):
        events = _relay_events(upstream, instance, outcome, on_done)
        return StreamingResponse(events, media_type=content_type)
    try:
        body = await unless_disconnected(raw, upstream.aread())
    except httpx.HTTPError as error:
        outcome = "broken"
        raise APIError(502, _failed_message(instance, error), type="server_error",
                       code="instance_failed") from error  # fmt: skip
    except APIError:  # the client went away
        outcome = "ok"
        raise
    finally:
        await upstream.aclose()
        on_done(outcome)
    return Response(body, status_code=upstream.status_code, media_type=content_type)


async def _relay_events(
    upstream: httpx.Response, instance: str, outcome: str, on_done: OnDone
) -> AsyncIterator[bytes]:
    """The instance's server-sent events, whole ones only: a stream cut mid-event ends
    after the last complete event with an error event instead of a torn line."""
    pending = b""
    try:
        async for chunk in upstream.aiter_raw():
            pending += chunk
            end = pending.rfind(b"\n\n")
            if end >= 0:
                yield pending[: end + 2]
                pending = pending[end + 2 :]
        if pending:
            yield pending
    except httpx.HTTPError as error:
        outcome = "broken"
        body = {"error": {"message": _failed_message(instance, error), "type": "server_error",
                          "code": "instance_failed"}}  # fmt: skip
        yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
    finally:
        # NOTE: also reached when the client disconnects (Starlette cancels this
        # generator): closing the upstream stream makes the instance abort the request.
        await upstream.aclose()
        on_done(outcome)


def _failed_message(instance: str, error: Exception) -> str:
    reason = str(error) or type(error).__name__
    return f"the instance {instance} failed while answering: {reason}"
