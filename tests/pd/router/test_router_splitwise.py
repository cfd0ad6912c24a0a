"""``pd-router --splitwise`` (a real process) in front of two tiny HTTP servers playing
a prefill and a decode instance: registration rules, the 503 that names the missing
role, and a request forwarded to the prefill instance with a decode rank's record and
the pair token.

NOTE: the tests share one router and run in file order (the first expects no decode
instance yet).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from cache_transfer.auth import bearer_token
from pd.args import pick_free_port
from pd.router.wire import DECODE_RANK_HEADER, PAIR_TOKEN_HEADER, REGISTER_PATH, check_pair_token
from tests.pd.router.router_process import instances, requests_by_instance, start_router
from tests.pd.router.test_pairing import rank

SECRET = "splitwise-router-test-secret-0123"
TOKEN = bearer_token(SECRET.encode(), "router")
ANSWER = {"id": "cmpl-1", "object": "text_completion", "model": "m",
          "choices": [{"index": 0, "text": " fixed", "finish_reason": "length"}]}  # fmt: skip


class FakeInstance(ThreadingHTTPServer):
    """Answers /health, and every POST with ANSWER; keeps (path, headers) of each POST."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[tuple[str, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeInstance

    def do_GET(self) -> None:
        self._answer({"status": "ok"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        self._answer(ANSWER)

    def _answer(self, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeInstance, FakeInstance]]:
    """(prefill, decode), serving on threads."""
    servers = (FakeInstance(), FakeInstance())
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    log = tmp_path_factory.mktemp("router") / "router.log"
    server = start_router(log, "--splitwise", "--policy", "round_robin", "--instance-timeout",
                          "30", env=dict(os.environ, PD_CLUSTER_SECRET=SECRET))  # fmt: skip
    yield server
    assert server.stop() == 0, server.log()


def register(router, url: str, role: str, pd_ranks: list[str] | None = None) -> httpx.Response:
    body = {"role": role, "url": url, "model_names": ["m"], "dp_rank": 0, "model_digest": "d1",
            "max_model_len": 256, "num_open": 0, "num_waiting": 0,
            "pd_ranks": [rank(role, f"{role}.dp0")] if pd_ranks is None else pd_ranks}  # fmt: skip
    return httpx.post(router.root_url + REGISTER_PATH, json=body, timeout=10,
                      headers={"authorization": f"Bearer {TOKEN}"})  # fmt: skip


def complete(router, model: str = "m", path: str = "/completions") -> httpx.Response:
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    if path == "/chat/completions":
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(router.base_url + path, json=body, timeout=30)


def test_a_missing_role_is_a_503_naming_it_then_pairs_go_to_the_prefill(router, fakes):
    prefill, decode = fakes
    assert register(router, prefill.url, "prefill").status_code == 200
    health = httpx.get(f"{router.root_url}/health", timeout=10)
    assert health.status_code == 503 and "no decode instance" in health.json()["reason"]
    missing = complete(router)
    assert missing.status_code == 503 and missing.headers["retry-after"] == "1"
    assert "no decode instance serving 'm' is up" in missing.json()["error"]["message"]

    ranks = [rank("decode", "decode.dp0"), rank("decode", "decode.dp1")]
    assert register(router, decode.url, "decode", ranks).status_code == 200
    assert httpx.get(f"{router.root_url}/health", timeout=10).status_code == 200
    assert complete(router).json() == ANSWER
    assert complete(router, path="/chat/completions").json() == ANSWER
    assert [path for path, _ in prefill.received] == ["/v1/completions", "/v1/chat/completions"]
    for _, headers in prefill.received:
        assert headers[DECODE_RANK_HEADER] in ranks
        assert check_pair_token(SECRET.encode(), headers[DECODE_RANK_HEADER],
                                headers[PAIR_TOKEN_HEADER])  # fmt: skip
    assert decode.received == []  # the prefill instance hands the decode over
    assert complete(router, model="other").status_code == 404
    known = instances(router)
    assert [(known[u]["role"], known[u]["in_flight"]) for u in (prefill.url, decode.url)] == [
        ("prefill", 0), ("decode", 0)]  # fmt: skip
    counts = requests_by_instance(router)
    assert counts[prefill.url] == counts[decode.url] == 2, counts


def test_an_unreachable_prefill_is_taken_out_and_another_one_tried(router, fakes):
    dead = f"http://127.0.0.1:{pick_free_port()}"  # nothing listens there
    assert register(router, dead, "prefill").status_code == 200
    # NOTE: round_robin over two prefills: one of the two requests picks the dead one
    # first, unless the prober took it out before.
    assert [complete(router).status_code for _ in range(2)] == [200, 200]
    assert not instances(router)[dead]["is_up"]


@pytest.mark.parametrize(("role", "pd_ranks", "message"), [
    ("mixed", [], "a mixed instance needs a router without --splitwise"),
    ("prefill", [], "a prefill instance must list its engine ranks"),
    ("prefill", ["%%%"], "pd_ranks[0] is not a base64 InstanceRecord"),
    ("decode", [rank("prefill")], "the record of a prefill rank, not of a decode rank"),
    ("decode", [rank("decode", "")], "pd_ranks[0] has no rank_id"),
])  # fmt: skip
def test_registrations_a_splitwise_router_refuses(router, role, pd_ranks, message):
    url = f"http://127.0.0.1:{pick_free_port()}"
    reply = register(router, url, role, pd_ranks)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
    assert url not in instances(router)
