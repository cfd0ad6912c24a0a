"""The official ``openai`` client against a real ``pd-serve`` on a tiny model.

One module-scoped server serves most tests; small dedicated servers cover the
flags that change behaviour (``--api-key`` with ``--served-model-name``, and
``--max-waiting-requests``). At teardown the main server must have every KV
block free again and exit 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import pd
from pd import LLM, SamplingParams
from pd.api.state import ServerState
from tests.pd.server_process import ServerProcess, start_server

MAX_MODEL_LEN = 256
MAX_TOKENS = 24
PROMPTS = [
    "x",
    "Hello world",
    "数据并行 is",
    "The cache moves layer by layer",
    "Prefill and decode run on different machines; " * 2,
    "A longer prompt, so that the prefill spans several KV blocks of sixteen tokens. " * 2,
]
CHATS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime number."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me about KV caches, in detail please."},
    ],
]
GREEDY: dict[str, Any] = {
    "temperature": 0,
    "max_tokens": MAX_TOKENS,
    "extra_body": {"ignore_eos": True},
}
_STATS_WAIT_S = 2.0  # the engine reports KV usage every 100 ms


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def model(model_dir: Path) -> str:
    """The served model name: the model path, as no --served-model-name is given."""
    return str(model_dir)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    server = start_server(model_dir, log_path)
    try:
        num_blocks = wait_until_all_blocks_free(server)
        yield server
        num_free_blocks = wait_until_all_blocks_free(server)
    finally:
        exit_code = server.stop()
    assert num_free_blocks == num_blocks
    assert exit_code == 0, server.log()[-4000:]
    assert "Traceback" not in server.log(), server.log()[-4000:]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline_llm(model_dir: Path) -> LLM:
    return LLM(model=str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, device="cpu")


@pytest.fixture(scope="module")
def greedy_texts(offline_llm: LLM) -> dict[str, str]:
    """Offline greedy output of each prompt in PROMPTS."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = offline_llm.generate(PROMPTS, params)
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, outputs, strict=True)}


def wait_until_all_blocks_free(server: ServerProcess) -> int:
    """The number of free KV blocks once none is in use (usage exactly 0)."""
    deadline = time.monotonic() + _STATS_WAIT_S
    while True:
        usage = server.metric("pd:kv_cache_usage_perc")
        num_free = server.metric("pd:num_gpu_blocks_free")
        if usage == 0.0 and num_free > 0:
            return int(num_free)
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still in use: usage {usage}, {num_free} free")
        time.sleep(0.05)


def assert_usage(usage: Any, num_prompt_tokens: int, num_completion_tokens: int) -> None:
    assert usage.prompt_tokens == num_prompt_tokens
    assert usage.completion_tokens == num_completion_tokens
    assert usage.total_tokens == num_prompt_tokens + num_completion_tokens


def collect(chunks: list[Any], text_of: Any) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Per choice index of a stream: the joined text and every finish reason seen."""
    texts: dict[int, str] = defaultdict(str)
    finish_reasons: dict[int, list[str]] = defaultdict(list)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += text_of(choice) or ""
            if choice.finish_reason is not None:
                finish_reasons[choice.index].append(choice.finish_reason)
    return dict(texts), dict(finish_reasons)


def assert_openai_error(response: httpx.Response, status: int, *words: str) -> dict:
    """``response`` is ``status`` with OpenAI's error JSON; its message has ``words``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    return error


# -- greedy parity with the offline LLM --------------------------------------------


def test_greedy_completions_match_offline_llm(client, model, offline_llm, greedy_texts):
    for prompt in PROMPTS:
        response = client.completions.create(model=model, prompt=prompt, **GREEDY)
        [choice] = response.choices
        assert choice.text == greedy_texts[prompt], prompt
        assert choice.finish_reason == "length"
        num_prompt_tokens = len(offline_llm.tokenizer.encode(prompt))
        assert_usage(response.usage, num_prompt_tokens, MAX_TOKENS)


def test_greedy_chat_matches_offline_llm(client, model, offline_llm):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = offline_llm.chat(CHATS, params)
    for messages, want in zip(CHATS, expected, strict=True):
        response = client.chat.completions.create(model=model, messages=messages, **GREEDY)
        [choice] = response.choices
        assert choice.message.role == "assistant"
        assert choice.message.content == want.outputs[0].text
        assert choice.finish_reason == "length"
        assert_usage(response.usage, len(want.prompt_token_ids), MAX_TOKENS)


# -- streaming ------------------------------------------------------------------


def test_streamed_completion_equals_non_streamed(client, model, offline_llm, greedy_texts):
    prompt = PROMPTS[3]
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks[:-1])
    texts, finish_reasons = collect(chunks, lambda choice: choice.text)
    assert texts == {0: greedy_texts[prompt], 1: greedy_texts[prompt]}
    assert finish_reasons == {0: ["length"], 1: ["length"]}
    assert chunks[-1].choices == []
    assert_usage(chunks[-1].usage, len(offline_llm.tokenizer.encode(prompt)), 2 * MAX_TOKENS)
    assert len({chunk.id for chunk in chunks}) == 1


def test_streamed_chat_equals_non_streamed(client, model):
    messages = CHATS[2]
    full = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    first, last = chunks[0], chunks[-1]
    assert [c.delta.role for c in first.choices] == ["assistant", "assistant"]
    assert all(c.delta.role is None for chunk in chunks[1:] for c in chunk.choices)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    texts, finish_reasons = collect(chunks, lambda choice: choice.delta.content)
    content = full.choices[0].message.content
    assert texts == {0: content, 1: content}
    assert finish_reasons == {0: ["length"], 1: ["length"]}
    assert last.choices == []
    assert_usage(last.usage, full.usage.prompt_tokens, 2 * MAX_TOKENS)


# -- n > 1, seeds, several prompts --------------------------------------------------


def test_n_choices_with_a_seed_are_reproducible(server, client, model):
    seeded: dict[str, Any] = {
        "model": model,
        "prompt": PROMPTS[1],
        "n": 3,
        "seed": 1234,
        "temperature": 1.0,
        "max_tokens": 16,
        "extra_body": {"ignore_eos": True},
    }
    alone = client.completions.create(**seeded)
    assert [c.index for c in alone.choices] == [0, 1, 2]
    assert alone.usage.completion_tokens == 3 * 16
    texts = [c.text for c in alone.choices]
    assert len(set(texts)) > 1, f"the three samples should differ: {texts}"

    async def seeded_among_others() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="x", max_retries=0, timeout=60
        ) as aclient:
            others = [
                aclient.completions.create(
                    model=model, prompt=prompt, temperature=1.0, max_tokens=16
                )
                for prompt in PROMPTS[2:6]
            ]
            *_, again = await asyncio.gather(*others, aclient.completions.create(**seeded))
            return [c.text for c in again.choices]

    # The seed fixes each choice whatever else shares the batch.
    assert asyncio.run(seeded_among_others()) == texts
    chat = client.chat.completions.create(
        model=model, messages=CHATS[0], n=3, seed=1234, temperature=1.0, max_tokens=16
    )
    assert [c.index for c in chat.choices] == [0, 1, 2]


def test_several_prompts_map_to_choice_indices(client, model, offline_llm, greedy_texts):
    prompts = PROMPTS[1:4]
    token_ids = [offline_llm.tokenizer.encode(p) for p in prompts]
    n = 2
    for prompt in (prompts, token_ids):
        response = client.completions.create(model=model, prompt=prompt, n=n, **GREEDY)
        assert [c.index for c in response.choices] == list(range(len(prompts) * n))
        for choice in response.choices:
            assert choice.text == greedy_texts[prompts[choice.index // n]]
        num_prompt_tokens = sum(len(ids) for ids in token_ids)
        assert_usage(response.usage, num_prompt_tokens, len(prompts) * n * MAX_TOKENS)
    one = client.completions.create(model=model, prompt=token_ids[0], **GREEDY)
    assert [c.text for c in one.choices] == [greedy_texts[prompts[0]]]
    assert_usage(one.usage, len(token_ids[0]), MAX_TOKENS)


# -- stop strings and logprobs --------------------------------------------------------


def _stop_in_middle(text: str) -> tuple[int, str]:
    """A 3-letter ASCII substring from the middle of ``text``, at its first occurrence."""
    for start in range(len(text) // 3, len(text) - 3):
        stop = text[start : start + 3]
        if stop.isascii() and stop.isalpha() and text.find(stop) == start:
            return start, stop
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_ends_the_text_right_before_it(client, model, greedy_texts):
    full = greedy_texts[PROMPTS[4]]
    start, stop = _stop_in_middle(full)
    response = client.completions.create(model=model, prompt=PROMPTS[4], stop=[stop], **GREEDY)
    [choice] = response.choices
    assert choice.text == full[:start]
    assert choice.finish_reason == "stop"
    streamed = client.completions.create(
        model=model, prompt=PROMPTS[4], stop=stop, stream=True, **GREEDY
    )
    assert collect(list(streamed), lambda choice: choice.text) == ({0: full[:start]}, {0: ["stop"]})

    reply = client.chat.completions.create(model=model, messages=CHATS[1], **GREEDY)
    content = reply.choices[0].message.content
    start, stop = _stop_in_middle(content)
    cut = client.chat.completions.create(model=model, messages=CHATS[1], stop=stop, **GREEDY)
    assert cut.choices[0].message.content == content[:start]
    assert cut.choices[0].finish_reason == "stop"


def test_completion_logprobs(client, model):
    response = client.completions.create(model=model, prompt=PROMPTS[2], logprobs=3, **GREEDY)
    [choice] = response.choices
    logprobs = choice.logprobs
    num_tokens = response.usage.completion_tokens
    assert num_tokens == MAX_TOKENS
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == num_tokens
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == num_tokens
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        # At most the top 3 (greedy: the chosen token is among them); fewer when two
        # tokens decode to the same text and share a key.
        assert 1 <= len(top) <= 3
        assert token in top
        assert logprob <= 0.0
        # Greedy: the chosen token is the most likely one.
        assert top[token] == pytest.approx(max(top.values()))


def test_chat_logprobs(client, model):
    response = client.chat.completions.create(
        model=model, messages=CHATS[0], logprobs=True, top_logprobs=2, **GREEDY
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == MAX_TOKENS
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob <= 0.0
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes) == entry.token.encode()


# -- many clients at once -----------------------------------------------------------


def test_concurrent_streams_do_not_interleave(server, model, offline_llm):
    prompts = [f"Request number {i}: {'abcdefgh'[i % 8] * (1 + i % 5)} go" for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline_llm.generate(prompts, params)]

    async def stream_one(client: openai.AsyncOpenAI, prompt: str) -> tuple:
        stream = await client.completions.create(
            model=model, prompt=prompt, temperature=0, max_tokens=16, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return collect([chunk async for chunk in stream], lambda choice: choice.text)

    async def stream_all() -> list[tuple]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="x", max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(stream_one(client, p) for p in prompts))

    results = asyncio.run(stream_all())
    assert [texts for texts, _ in results] == [{0: text} for text in expected]
    assert all(reasons == {0: ["length"]} for _, reasons in results)


# -- bad input ------------------------------------------------------------------------

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
_BAD_FIELDS = [
    # (field, value, param, words in the message)
    ("max_tokens", "ten", "max_tokens", ["max_tokens", "integer", "ten"]),
    ("max_tokens", -1, "max_tokens", ["max_tokens", "greater than or equal to 1"]),
    ("n", 0, "n", ["'n'", "greater than or equal to 1"]),
    ("n", 100000, "n", ["'n'", "less than or equal to"]),
    ("temperature", -1, "temperature", ["temperature"]),
    ("top_p", 2, "top_p", ["top_p"]),
    ("frobnicate", True, "frobnicate", ["unrecognized", "frobnicate"]),
]


def _body(path: str, model: str, **fields: Any) -> dict:
    if path == COMPLETIONS:
        return {"model": model, "prompt": "Hello", "max_tokens": 4, **fields}
    return {"model": model, "messages": CHATS[0], "max_tokens": 4, **fields}


def _post(server: ServerProcess, path: str, content: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(server.root_url + path, content=content, headers=headers, timeout=60)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize(("field", "value", "param", "words"), _BAD_FIELDS)
def test_bad_field_is_a_400(server, model, path, field, value, param, words):
    body = json.dumps(_body(path, model, **{field: value})).encode()
    error = assert_openai_error(_post(server, path, body), 400, *words)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_bad_body_is_a_4xx(server, model, path):
    good = json.dumps(_body(path, model)).encode()
    cases = [
        (b'{"model": ', 400, ["parse", "JSON"]),
        (b"[1, 2]", 400, ["JSON object"]),
        (good[:-1] + b', "user": "\xff\xfe"}', 400, ["UTF-8"]),
        (good[:-1] + b', "user": "' + b"x" * (16 * 1024 * 1024) + b'"}', 413, ["too large"]),
    ]
    for content, status, words in cases:
        assert_openai_error(_post(server, path, content), status, *words)
    unknown = json.dumps(_body(path, "no-such-model")).encode()
    error = assert_openai_error(_post(server, path, unknown), 404, "no-such-model", model)
    assert error["param"] == "model" and error["code"] == "model_not_found"


def test_empty_prompt_and_messages_are_400(server, model):
    for prompt in ("", [], [[]], [""]):
        body = json.dumps(_body(COMPLETIONS, model, prompt=prompt)).encode()
        error = assert_openai_error(_post(server, COMPLETIONS, body), 400, "prompt")
        assert error["param"] == "prompt"
    body = json.dumps(_body(CHAT, model, messages=[])).encode()
    error = assert_openai_error(_post(server, CHAT, body), 400, "messages")
    assert error["param"] == "messages"


def test_too_long_prompt_is_400_with_the_lengths(server, model, offline_llm):
    prompt = "cache " * 300
    num_tokens = len(offline_llm.tokenizer.encode(prompt))
    assert num_tokens > MAX_MODEL_LEN
    body = json.dumps(_body(COMPLETIONS, model, prompt=prompt)).encode()
    error = assert_openai_error(
        _post(server, COMPLETIONS, body), 400, str(MAX_MODEL_LEN), str(num_tokens)
    )
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"

    messages = [{"role": "user", "content": prompt}]
    body = json.dumps(_body(CHAT, model, messages=messages)).encode()
    error = assert_openai_error(_post(server, CHAT, body), 400, str(MAX_MODEL_LEN))
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"

    short = "cache " * 40  # fits, but not with 250 tokens more
    num_tokens = len(offline_llm.tokenizer.encode(short))
    body = json.dumps(_body(COMPLETIONS, model, prompt=short, max_tokens=250)).encode()
    error = assert_openai_error(
        _post(server, COMPLETIONS, body), 400, str(MAX_MODEL_LEN), str(num_tokens + 250)
    )
    assert error["param"] == "max_tokens"


_HUGE_BODIES = [
    pytest.param(COMPLETIONS, {"prompt": "kv " * 400_000}, id="text-1.2MB"),
    pytest.param(COMPLETIONS, {"prompt": [1] * 3_500_000}, id="token-ids-7MB"),
    pytest.param(
        CHAT, {"messages": [{"role": "user", "content": "kv"}] * 150_000}, id="messages-4.6MB"
    ),
]


@pytest.mark.parametrize(("path", "fields"), _HUGE_BODIES)
def test_huge_prompt_does_not_stall_other_requests(server, model, offline_llm, path, fields):
    """A prompt far over max-model-len is refused without blocking the event loop."""
    content = json.dumps(_body(path, model, **fields), separators=(",", ":")).encode()
    headers = {"content-type": "application/json"}

    async def health_while_huge_is_served() -> tuple[httpx.Response, float, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.root_url, timeout=60) as http:
            await http.get("/health")  # connect first
            pending = asyncio.ensure_future(http.post(path, content=content, headers=headers))
            await asyncio.sleep(0.3)
            start = time.monotonic()
            health = await http.get("/health")
            return health, time.monotonic() - start, await pending

    health, seconds, response = asyncio.run(health_while_huge_is_served())
    # 413 unparsed when the body is larger than any servable request can be
    # (ServerState.max_body_bytes), else 400 once parsed (too long for the context).
    limits = ServerState(None, offline_llm.tokenizer, [], None, max_model_len=MAX_MODEL_LEN)
    too_large = len(content) > limits.max_body_bytes
    assert_openai_error(response, 413 if too_large else 400, str(MAX_MODEL_LEN))
    assert health.status_code == 200
    assert seconds < 1.0, f"/health took {seconds:.2f} s behind one huge prompt"


def test_server_serves_normally_after_bad_input(server, client, model, greedy_texts):
    assert httpx.get(f"{server.root_url}/health", timeout=10).status_code == 200
    response = client.completions.create(model=model, prompt=PROMPTS[1], **GREEDY)
    assert response.choices[0].text == greedy_texts[PROMPTS[1]]


# -- models, version, health ------------------------------------------------------------


def test_models_version_and_health(server, client, model):
    assert [m.id for m in client.models.list().data] == [model]
    version = httpx.get(f"{server.root_url}/version", timeout=10)
    assert version.json() == {"version": pd.__version__}
    health = httpx.get(f"{server.root_url}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


# -- dedicated servers for flags ---------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log_path = tmp_path_factory.mktemp("serve-keyed") / "server.log"
    server = start_server(
        model_dir, log_path, "--api-key", "secret", "--served-model-name", "my-model",
        "--max-request-tokens", "64",
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log()[-4000:]


def test_api_key_is_enforced(keyed_server, model):
    url = keyed_server.root_url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
        assert_openai_error(models, 401, "api key")
        body = {"model": "my-model", "prompt": "Hello", "max_tokens": 2}
        completion = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=10)
        assert_openai_error(completion, 401, "api key")
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200

    wrong = openai.OpenAI(base_url=keyed_server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    client = openai.OpenAI(base_url=keyed_server.base_url, api_key="secret", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["my-model"]
    response = client.completions.create(model="my-model", prompt="Hello", max_tokens=3)
    assert response.model == "my-model" and response.usage.completion_tokens <= 3
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=model, prompt="Hello", max_tokens=3)


def test_api_key_guards_metrics_version_and_openapi_but_not_health(keyed_server):
    """Issue 17: with --api-key these answered anyone. /health stays open (probes)."""
    url = keyed_server.root_url
    for path in ("/metrics", "/version", "/openapi.json"):
        assert_openai_error(httpx.get(f"{url}{path}", timeout=10), 401, "api key")
        keyed = httpx.get(f"{url}{path}", headers={"Authorization": "Bearer secret"}, timeout=10)
        assert keyed.status_code == 200, (path, keyed.text)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_generated_tokens_per_request_are_bounded(keyed_server):
    """Issue 17: n=127 without max_tokens generated 108,486 tokens; the mixed server took
    top_k >= 2**31, which the cluster's records cannot carry."""
    client = openai.OpenAI(base_url=keyed_server.base_url, api_key="secret", max_retries=0)
    chat = client.chat.completions.create(
        model="my-model", messages=[{"role": "user", "content": "Hi"}], n=16,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert chat.usage.completion_tokens == 64  # --max-request-tokens: 4 tokens a choice
    reply = client.completions.create(
        model="my-model", prompt="Hello", n=8, max_tokens=None, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 64
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="my-model", prompt="Hello", n=4, max_tokens=17)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model="my-model", messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=33
        )
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.completions.create(
            model="my-model", prompt="Hello", max_tokens=2, extra_body={"top_k": 2**31}
        )
    ok = client.completions.create(
        model="my-model", prompt="Hello", max_tokens=2, extra_body={"top_k": 2**31 - 1}
    )
    assert ok.usage.completion_tokens <= 2


def test_health_answers_503_while_the_engine_is_frozen(keyed_server):
    """Issue 17: SIGSTOP of the engine for 20 s, /health said 200 throughout."""
    from pd.api.server import HEALTH_STALE_S

    url = f"{keyed_server.root_url}/health"
    pid = keyed_server.engine_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        while httpx.get(url, timeout=5).status_code == 200:
            assert time.monotonic() - stopped < HEALTH_STALE_S + 3, "still 200"
            time.sleep(0.2)
        frozen = httpx.get(url, timeout=5)
        assert frozen.status_code == 503 and "has not reported" in frozen.json()["reason"]
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while httpx.get(url, timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "healthy again after SIGCONT"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def busy_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log_path = tmp_path_factory.mktemp("serve-busy") / "server.log"
    server = start_server(model_dir, log_path, "--max-waiting-requests", "1")
    yield server
    assert server.stop() == 0, server.log()[-4000:]


def _long_prompt_body(model: str, i: int) -> dict:
    return {"model": model, "prompt": f"{i} " + "kv " * 60, "max_tokens": 4}  # ~180 tokens


def test_full_waiting_queue_answers_503_with_retry_after(busy_server, model):
    """With the engine paused (SIGSTOP) no request gets its first token: the first one
    waits, later ones are refused at once, and the first is answered once it resumes."""
    engine_pid = busy_server.engine_pid()

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=busy_server.root_url, timeout=120) as http:
            first = asyncio.create_task(http.post("/v1/completions",
                                                  json=_long_prompt_body(model, 0)))  # fmt: skip
            await asyncio.sleep(0.5)  # it is open, waiting for the paused engine
            refused = [await http.post("/v1/completions", json=_long_prompt_body(model, i))
                       for i in range(1, 4)]  # fmt: skip
            os.kill(engine_pid, signal.SIGCONT)
            return [await first, *refused]

    os.kill(engine_pid, signal.SIGSTOP)
    try:
        responses = asyncio.run(fire())
    finally:
        os.kill(engine_pid, signal.SIGCONT)
    assert [r.status_code for r in responses] == [200, 503, 503, 503]
    for response in responses[1:]:
        assert response.headers["retry-after"].isdigit()
        error = assert_openai_error(response, 503, "busy")
        assert error["type"] == "overloaded_error"
    assert httpx.get(f"{busy_server.root_url}/health", timeout=10).status_code == 200
    after = httpx.post(
        f"{busy_server.root_url}/v1/completions", json=_long_prompt_body(model, 99), timeout=60
    )
    assert after.status_code == 200, after.text


def _posts_read_at_once(server: ServerProcess, path: str, bodies: list[dict]) -> list[int]:
    """POST each body on its own connection while the API server process is stopped
    (SIGSTOP), so that it reads every request in one event-loop iteration; the statuses."""
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in bodies]
    time.sleep(0.2)  # the server accepts every connection first
    server.process.send_signal(signal.SIGSTOP)
    try:
        for sock, body in zip(sockets, bodies, strict=True):
            content = json.dumps(body).encode()
            head = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(content)}\r\nConnection: close\r\n\r\n"
            )
            sock.sendall(head.encode() + content)
    finally:
        server.process.send_signal(signal.SIGCONT)
    statuses = []
    for sock in sockets:
        with sock, sock.makefile("rb") as response:
            statuses.append(int(response.readline().split()[1]))
    return statuses


def test_simultaneous_requests_respect_the_waiting_bound(busy_server, model):
    bodies = [_long_prompt_body(model, i) for i in range(16)]
    statuses = _posts_read_at_once(busy_server, "/v1/completions", bodies)
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses


def test_out_of_range_integers_are_400_and_free_their_slot(busy_server, model):
    """Integers too big for the engine's wire format are input errors, and a refused
    request gives its waiting slot back (else this server would answer 503 forever)."""
    url = f"{busy_server.root_url}/v1/completions"
    fields = {"top_k": 2**64, "stop_token_ids": [2**64]}
    bad = {
        field: httpx.post(url, json={**_long_prompt_body(model, 0), field: value}, timeout=60)
        for field, value in fields.items()
    }
    after = httpx.post(url, json=_long_prompt_body(model, 1), timeout=60)
    for field, response in bad.items():
        assert_openai_error(response, 400, field)
    assert after.status_code == 200, after.text
