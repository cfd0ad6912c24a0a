"""The OpenAI-compatible HTTP app: routes, auth, health, metrics.

Handlers live in serving_completion.py and serving_chat.py; this file wires
them to FastAPI and owns what is common: the API key, the waiting-queue bound,
and errors in OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

import pd
from pd.api.errors import APIError, install_error_handlers
from pd.api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from pd.api.serving_chat import create_chat_completion
from pd.api.serving_completion import create_completion
from pd.api.state import ServerState
from pd.engine_client import RouteRefused

RequestT = TypeVar("RequestT", CompletionRequest, ChatCompletionRequest)
# The engine reports every 100 ms between steps; silent this long, it is not serving.
# NOTE: above the longest step we expect on CPU (a full prefill chunk of a 135M model on
# two busy cores takes about a second).
HEALTH_STALE_S = 5.0


def build_app(state: ServerState) -> FastAPI:
    # NOTE: with --api-key, /openapi.json, /version and /metrics need the key too; /health
    # stays open, as in vLLM: load balancers and orchestrators probe it without secrets,
    # and it tells only "ok" or why not.
    app = FastAPI(
        title="pd-serve", version=pd.__version__, docs_url=None, redoc_url=None,
        openapi_url=None if state.args.api_key else "/openapi.json",
    )  # fmt: skip
    app.state.pd = state
    install_error_handlers(app)
    started = int(time.time())
    auth = api_key_dependencies(state.args.api_key)

    @app.get("/health")
    async def health() -> Response:
        reason = _unhealthy(state)
        if reason is not None:
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version", dependencies=auth)
    async def version() -> dict:
        return {"version": pd.__version__}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> ModelList:
        cards = [
            ModelCard(id=name, created=started, max_model_len=state.max_model_len)
            for name in state.model_names
        ]
        return ModelList(data=cards)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(raw: Request) -> Response:
        route = _route(state, raw)
        body = await _parse(raw, CompletionRequest, state.max_body_bytes)
        _admit(state, body.model)
        return await create_completion(state, body, raw, route)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(raw: Request) -> Response:
        route = _route(state, raw)
        body = await _parse(raw, ChatCompletionRequest, state.max_body_bytes)
        _admit(state, body.model)
        return await create_chat_completion(state, body, raw, route)

    if state.args.api_key:

        @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
        async def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

    if state.args.metrics_port is None:
        state.metrics.add_metrics_route(app, dependencies=auth)
    return app


def _unhealthy(state: ServerState) -> str | None:
    """Why the instance cannot serve now, or None: no engine, a dead one, or one that has
    not reported for HEALTH_STALE_S (frozen: stopped, stuck, or swapping)."""
    engine = state.engine
    if engine is None:
        return "engine not running"
    if engine.dead_reason is not None:
        return engine.dead_reason
    if engine.last_stats_at is not None:
        silent_s = time.monotonic() - engine.last_stats_at
        if silent_s > HEALTH_STALE_S:
            return f"the engine has not reported for {silent_s:.1f} s"
    return None


def _route(state: ServerState, raw: Request) -> object | None:
    """Where the request runs, as its headers say (a router's pairing), before the body
    is read: a refused pairing costs nothing."""
    assert state.engine is not None
    try:
        return state.engine.route_for(raw.headers)
    except RouteRefused as error:
        kind = "authentication_error" if error.status == 401 else "invalid_request_error"
        raise APIError(error.status, str(error), type=kind) from error


async def _parse(raw: Request, model: type[RequestT], max_bytes: int | None) -> RequestT:
    """Parse and validate a JSON body in a worker thread; a body larger than any
    request the model can serve (``ServerState.max_body_bytes``) is refused unparsed."""
    content_type = raw.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(400, "send the request body as JSON with Content-Type: application/json")
    body = await raw.body()
    if max_bytes is not None and len(body) > max_bytes:
        raise APIError(
            413,
            f"the request body has {len(body)} bytes; no request to this model (maximum "
            f"context length {raw.app.state.pd.max_model_len} tokens) needs more than "
            f"{max_bytes}",
        )
    return await asyncio.to_thread(_validate, model, body)


def _validate(model: type[RequestT], body: bytes) -> RequestT:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise APIError(400, f"the request body is not valid UTF-8: {error}") from error
    return model.model_validate_json(text)


def api_key_dependencies(api_key: str | None) -> list:
    """FastAPI dependencies that require ``Authorization: Bearer <api_key>`` (none
    without a key)."""
    if not api_key:
        return []
    expected = api_key.encode()

    async def check_api_key(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected):
            raise APIError(401, "invalid or missing API key", type="authentication_error")

    return [Depends(check_api_key)]


def _admit(state: ServerState, model: str) -> None:
    """Refuse what cannot be served before any work is done."""
    if model not in state.model_names:
        raise APIError(
            404,
            f"the model {model!r} does not exist; served: {', '.join(state.model_names)}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
    engine = state.engine
    if engine is None or engine.dead_reason is not None:
        raise APIError(503, "the engine is not running", type="server_error")
    # The waiting-queue bound is checked when the request is submitted
    # (EngineClient.open), atomically with its registration.
