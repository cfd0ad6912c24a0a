"""HTTP to the server under test: list its models, and send one streamed request,
timing each chunk into a ``RequestRecord``.

Every failure of a request (refused connection, non-200 status, an error event in
the stream, a timeout) becomes a failed record with its reason; nothing raises.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from pd.bench.config import BenchConfig
from pd.bench.dataset import BenchPrompt
from pd.bench.record import RequestRecord

MAX_ERROR_CHARS = 300
DONE = "[DONE]"


class RequestFailed(Exception):
    """The server answered, but not with a usable stream."""


def open_client(config: BenchConfig) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    return httpx.AsyncClient(
        headers=headers,
        timeout=httpx.Timeout(config.request_timeout_s),
        # NOTE: no pool limit, so that queueing for a connection never adds to TTFT;
        # --max-concurrency is the only bound on requests in flight.
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )


async def first_model_id(client: httpx.AsyncClient, base_url: str) -> str:
    """The first id of ``GET {base_url}/models``; RequestFailed says why not."""
    url = base_url.rstrip("/") + "/models"
    try:
        response = await client.get(url)
    except httpx.HTTPError as error:
        raise RequestFailed(f"GET {url}: {describe(error)}") from error
    if response.status_code != 200:
        raise RequestFailed(f"GET {url}: HTTP {response.status_code}: {error_message(response)}")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, LookupError, TypeError) as error:
        raise RequestFailed(f"GET {url}: no model listed in {response.text!r:.200}") from error


def request_body(config: BenchConfig, model: str, prompt: BenchPrompt) -> dict[str, Any]:
    """Greedy, exactly ``output_len`` tokens (``ignore_eos``), streamed with usage."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": prompt.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.prompt}]
    else:
        body["prompt"] = prompt.prompt
    return body


@dataclass
class _Timing:
    """Running measurements of one stream."""

    start: float
    ttft_s: float | None = None
    last: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    num_output_chunks: int = 0
    usage: dict[str, Any] | None = None

    def on_output(self, now: float) -> None:
        if self.ttft_s is None:
            self.ttft_s = now - self.start
        else:
            self.itl_s.append(now - self.last)
        self.last = now
        self.num_output_chunks += 1


async def send(
    client: httpx.AsyncClient,
    config: BenchConfig,
    model: str,
    index: int,
    prompt: BenchPrompt,
    run_start: float,
) -> RequestRecord:
    """Send one request and time it; never raises (but can be cancelled)."""
    timing = _Timing(start=time.perf_counter())
    start_s = timing.start - run_start
    body = request_body(config, model, prompt)
    try:
        stream = _stream(client, config.endpoint_url, body, timing)
        await asyncio.wait_for(stream, config.request_timeout_s)
    except asyncio.TimeoutError:
        error = f"timed out after {config.request_timeout_s:g} s"
        return RequestRecord.failed(index, error, start_s)
    except RequestFailed as error:
        return RequestRecord.failed(index, str(error), start_s)
    # NOTE: any other error (connection, protocol, a malformed chunk) fails this
    # request alone; one bad request must not end the run.
    except Exception as error:
        return RequestRecord.failed(index, describe(error), start_s)
    latency_s = time.perf_counter() - timing.start
    if timing.ttft_s is None:
        return RequestRecord.failed(index, "the stream ended without output", start_s)
    usage = timing.usage or {}
    return RequestRecord(
        index=index,
        is_success=True,
        num_prompt_tokens=int(usage.get("prompt_tokens", prompt.prompt_len)),
        num_output_tokens=int(usage.get("completion_tokens", timing.num_output_chunks)),
        start_s=start_s,
        ttft_s=timing.ttft_s,
        latency_s=latency_s,
        itl_s=timing.itl_s,
    )


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], timing: _Timing
) -> None:
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RequestFailed(f"HTTP {response.status_code}: {error_message(response)}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[len("data:") :].strip()
            if data == DONE:
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise RequestFailed(f"error in stream: {_message_of(chunk)}")
            if chunk.get("usage"):
                timing.usage = chunk["usage"]
            if any(_has_output(choice) for choice in chunk.get("choices") or []):
                timing.on_output(time.perf_counter())
    raise RequestFailed(f"the stream ended without {DONE}")


def _has_output(choice: dict[str, Any]) -> bool:
    """Text (completions) or content (chat), or the last chunk of a choice. Chat's
    opening chunk (role only, empty content) is not output."""
    text = choice.get("text") or (choice.get("delta") or {}).get("content")
    return bool(text) or choice.get("finish_reason") is not None


def error_message(response: httpx.Response) -> str:
    """OpenAI's ``{"error": {"message": ...}}``, else the start of the body."""
    try:
        return _message_of(response.json())
    except ValueError:
        return response.text[:MAX_ERROR_CHARS] or response.reason_phrase


def _message_of(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:MAX_ERROR_CHARS]
    return json.dumps(body)[:MAX_ERROR_CHARS]


def describe(error: BaseException) -> str:
    """An exception as one line: its type, and its message when it has one."""
    message = str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
