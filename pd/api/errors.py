"""Every failure in OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``.

``install_error_handlers`` maps what can go wrong while serving a request onto that
shape: our ``APIError``, invalid input (4xx, never 422), unknown routes, oversized
bodies (413) and, last, unexpected exceptions (500, logged, no traceback sent).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# Where FastAPI says a value came from; not part of the parameter's name.
_REQUEST_PARTS = {"body", "query", "path", "header", "cookie"}
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
# Pydantic names union members in error locations, e.g. ("stop", "list[str]").
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}
_NOT_AN_OBJECT = {"missing", "model_type", "model_attributes_type", "dict_type"}


def error_type_for_status(status: int) -> str:
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "server_error" if status >= 500 else "invalid_request_error"


class APIError(Exception):
    """An error to answer with ``status``; ``type`` defaults from the status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type_for_status(status)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    error = {
        "message": message,
        "type": type or error_type_for_status(status),
        "param": param,
        "code": code,
    }
    return JSONResponse({"error": error}, status_code=status, headers=dict(headers or {}))


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """A readable message and the offending parameter (``messages[0].content``) for
    pydantic's or FastAPI's error list; reports the first failing parameter."""
    if not errors:
        return "Invalid request", None
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "invalid JSON")
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        return f"We could not parse the JSON body of your request: {reason}{where}", None
    param = param_path(loc)
    if param is None and first.get("type") in _NOT_AN_OBJECT:
        return "The request body must be a JSON object (Content-Type: application/json)", None
    if param is None:
        return f"Invalid request body: {_reason(first)}{_got(first)}", None
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'", param
    same = [e for e in errors if param_path(tuple(e.get("loc", ()))) == param]
    reasons = list(dict.fromkeys(_reason(e) for e in same))
    return f"Invalid value for '{param}': {' or '.join(reasons)}{_got(first)}", param


def param_path(loc: Sequence[int | str]) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``"messages[0].content"``."""
    parts = list(loc[1:] if loc and loc[0] in _REQUEST_PARTS else loc)
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _FIELD_NAME.fullmatch(part) and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path or None


def _reason(error: Mapping[str, Any]) -> str:
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def _got(error: Mapping[str, Any]) -> str:
    value = error.get("input")
    if error.get("type") == "value_error" or not isinstance(value, (int, float, str, bool)):
        return ""  # our own messages say what was wrong; big inputs are not echoed
    shown = json.dumps(value)
    return f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(
        exc.status,
        exc.message,
        type=exc.type,
        param=exc.param,
        code=exc.code,
        headers=exc.headers,
    )


async def _on_validation_error(
    request: Request, exc: RequestValidationError | ValidationError
) -> JSONResponse:
    message, param = describe_validation_errors(exc.errors())
    return error_response(400, message, param=param)


async def _on_value_error(request: Request, exc: ValueError) -> JSONResponse:
    if isinstance(exc, json.JSONDecodeError):
        message = f"We could not parse the JSON body of your request: {exc.msg}"
    elif isinstance(exc, UnicodeDecodeError):
        message = "The request body is not valid UTF-8"
    else:
        message = str(exc) or "Invalid request"
    return error_response(400, message)


async def _on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    message = str(exc.detail)
    if status in (404, 405) and message == HTTPStatus(status).phrase:
        what = "is not a route" if status == 404 else "is not allowed"
        message = f"{request.method} {request.url.path} {what}"
    elif message == "There was an error parsing the body":
        message = "The request body could not be parsed (it must be UTF-8 encoded JSON)"
    return error_response(status, message, headers=exc.headers)


class RequestBodyTooLarge(StarletteHTTPException):
    """413; an HTTPException so that FastAPI's body parsing lets it through."""

    def __init__(self, max_body_bytes: int, num_bytes: int | None = None):
        size = "" if num_bytes is None else f" ({num_bytes} bytes)"
        message = f"Request body too large{size}: the limit is {max_body_bytes} bytes"
        super().__init__(413, message)


class BodySizeLimitMiddleware:
    """Answers 413 for a body over ``max_body_bytes``: before reading anything when
    Content-Length says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, got {max_body_bytes}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            error = RequestBodyTooLarge(self.max_body_bytes, declared)
            response = error_response(413, str(error.detail), headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    def _limited(self, receive: Receive) -> Receive:
        num_received = 0

        async def limited_receive() -> Message:
            nonlocal num_received
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > self.max_body_bytes:
                    raise RequestBodyTooLarge(self.max_body_bytes)
            return message

        return limited_receive


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class _UnhandledErrorMiddleware:
    """Turns an exception no handler took into a logged 500 without a traceback."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal is_started
            is_started = is_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error serving %s %s", scope["method"], scope["path"])
            if is_started:
                raise  # NOTE: too late for an error body; the server closes the connection.
            response = error_response(500, "Internal server error", type="server_error")
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Register the handlers and the body-size and last-resort middlewares on ``app``
    (before it starts serving)."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(ValidationError, _on_validation_error)
    app.add_exception_handler(ValueError, _on_value_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_body_bytes)
    app.add_middleware(_UnhandledErrorMiddleware)
