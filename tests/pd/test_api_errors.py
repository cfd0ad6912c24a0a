"""Every failure a client can provoke gets OpenAI's error JSON and the right status."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from pd.api.errors import (
    APIError,
    BodySizeLimitMiddleware,
    describe_validation_errors,
    install_error_handlers,
    param_path,
)
from pd.api.protocol import ChatCompletionRequest, CompletionRequest

MAX_BODY_BYTES = 4096


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app, max_body_bytes=MAX_BODY_BYTES)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        return {"max_tokens": body.to_sampling_params(default_max_tokens=100).max_tokens}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict[str, Any]:
        return {"num_messages": len(body.messages)}

    @app.post("/manual")
    async def manual(request: Request) -> dict[str, Any]:
        body = CompletionRequest.model_validate(await request.json())
        return {"prompt": body.prompt}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    @app.get("/busy")
    async def busy() -> None:
        raise APIError(503, "busy, retry", headers={"Retry-After": "1"})

    return app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(make_app(), raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def post_json(client: TestClient, path: str, body: bytes | str) -> httpx.Response:
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


def test_malformed_json(client):
    for raw in ['{"model": "m", "prompt": ', "not json", '{"model": "m",}']:
        error = error_of(post_json(client, "/v1/completions", raw), 400)
        assert "parse the JSON" in error["message"]
        assert (error["type"], error["param"]) == ("invalid_request_error", None)


def test_body_must_be_an_object(client):
    error = error_of(post_json(client, "/v1/completions", "[1, 2]"), 400)
    assert "JSON object" in error["message"]
    error = error_of(client.post("/v1/completions"), 400)
    assert "JSON object" in error["message"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "m", "prompt": "x", "max_tokens": "16"}, "max_tokens", "valid integer"),
        ({"model": "m", "prompt": "x", "max_tokens": -5}, "max_tokens", "greater than"),
        ({"model": "m", "prompt": "x", "n": 0}, "n", "greater than"),
        ({"model": "m", "prompt": "x", "n": 100000}, "n", "less than"),
        ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature", "number"),
        ({"model": "m", "prompt": "x", "stop": 5}, "stop", "valid string or"),
        ({"model": "m", "prompt": ""}, "prompt", "must not be empty"),
        ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix", "not supported"),
        ({"prompt": "x"}, "model", "Missing required parameter"),
    ],
)
def test_invalid_values_name_the_parameter(client, body, param, words):
    error = error_of(client.post("/v1/completions", json=body), 400)
    assert error["param"] == param
    assert words in error["message"]


def test_unknown_field(client):
    body = {"model": "m", "prompt": "x", "frobnicate": True}
    error = error_of(client.post("/v1/completions", json=body), 400)
    assert error["message"] == "Unrecognized request argument supplied: frobnicate"
    assert error["param"] == "frobnicate"


def test_nested_parameters(client):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    body = {"model": "m", "messages": [{"role": "user", "content": [image]}]}
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages[0].content"
    assert "text input only" in error["message"]
    body = {"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "bot"}]}
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages[1].role"
    error = error_of(client.post("/v1/chat/completions", json={"model": "m", "messages": []}), 400)
    assert error["param"] == "messages"


def test_value_error_from_sampling_params(client):
    body = {"model": "m", "prompt": "x", "max_tokens": 2, "min_tokens": 5}
    error = error_of(client.post("/v1/completions", json=body), 400)
    assert "min_tokens" in error["message"]


def test_invalid_utf8(client):
    raw = b'{"model": "m", "prompt": "\xff\xfe\xfa"}'
    for path in ("/v1/completions", "/manual"):
        error = error_of(post_json(client, path, raw), 400)
        assert error["type"] == "invalid_request_error"


def test_handler_side_validation(client):
    error = error_of(post_json(client, "/manual", "{oops"), 400)
    assert "parse the JSON" in error["message"]
    error = error_of(client.post("/manual", json={"model": "m", "prompt": "x", "n": -1}), 400)
    assert error["param"] == "n"


def test_oversized_body_by_content_length(client):
    body = {"model": "m", "prompt": "x" * (2 * MAX_BODY_BYTES)}
    error = error_of(client.post("/v1/completions", json=body), 413)
    assert str(MAX_BODY_BYTES) in error["message"]


def test_oversized_body_streamed_without_content_length(client):
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "prompt": "'
        for _ in range(8):
            yield b"x" * 1024
        yield b'"}'

    response = client.post(
        "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    error_of(response, 413)


def test_content_length_refusal_reads_nothing():
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not run")

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-length", str(10**12).encode())]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(BodySizeLimitMiddleware(app, max_body_bytes=10)(scope, receive, send))
    assert sent[0]["status"] == 413


def test_unknown_route_and_method(client):
    error = error_of(client.get("/v1/nothing"), 404)
    assert error["type"] == "not_found_error"
    assert "/v1/nothing" in error["message"]
    error = error_of(client.get("/v1/completions"), 405)
    assert "GET" in error["message"]


def test_unhandled_exception_is_a_clean_500(client, caplog):
    with caplog.at_level(logging.ERROR, logger="pd.api.errors"):
        response = client.get("/boom")
    error = error_of(response, 500)
    assert error["type"] == "server_error"
    assert "secret" not in response.text and "Traceback" not in response.text
    assert any("secret internals" in (r.exc_text or "") for r in caplog.records)


def test_api_error_keeps_status_and_headers(client):
    response = client.get("/busy")
    error = error_of(response, 503)
    assert (error["type"], error["message"]) == ("overloaded_error", "busy, retry")
    assert response.headers["retry-after"] == "1"


def test_server_still_answers_after_errors(client):
    for _ in range(3):
        client.get("/boom")
        post_json(client, "/v1/completions", b"\xff")
    response = client.post(
        "/v1/completions", json={"model": "m", "prompt": [1, 2], "max_tokens": 3}
    )
    assert response.status_code == 200 and response.json() == {"max_tokens": 3}


def test_param_path_and_messages():
    assert param_path(("body", "messages", 0, "content", "list[TextContentPart]", 1)) == (
        "messages[0].content[1]"
    )
    assert param_path(("stop", "str")) == "stop"
    assert param_path(("body",)) is None
    errors = [
        {"type": "int_type", "loc": ("n",), "msg": "Input should be a valid integer", "input": "3"}
    ]
    assert describe_validation_errors(errors) == (
        "Invalid value for 'n': Input should be a valid integer (got \"3\")",
        "n",
    )
