"""``pd-serve cluster`` with its default model (SmolLM2-135M-Instruct, a GGUF file) as a
user runs it: 1P1D over ipc and over tcp, the --ask answer and every chat answer through
the official openai client equal to the offline engine's greedy answers."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import openai
import pytest

from pd.default_model import DEFAULT_MODEL_NAME
from tests.pd.real_model import MAX_TOKENS, QUESTIONS, messages, offline_answers, smollm2_path
from tests.pd.server_process import ClusterLauncher

pytestmark = pytest.mark.slow

CAPITAL = "What is the capital of France?"


# ipc only: tcp moves the same blocks (tests/cluster/test_pd_parity.py runs both on the
# tiny model), and CI's 20 minutes on 2 cores cannot hold a second real-model cluster.
@pytest.mark.parametrize("protocol", ["ipc"])
def test_default_model_answers_as_offline(protocol: str, tmp_path: Path):
    smollm2_path()  # skips where the model is not installed
    expected = [text for _, text in offline_answers()]
    # NOTE: one torch thread per process: four processes share CI's two cores, and
    # oversubscribed torch threads make each step many times slower.
    launcher = ClusterLauncher([
        "--port", "0", "--log-dir", str(tmp_path), "--ask", CAPITAL, "--device", "cpu",
        "--dtype", "float32", "--max-model-len", "256", "--cache-transfer-protocol", protocol,
    ], env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    try:
        launcher.read_until("Ctrl-C stops", timeout_s=300)
        output = launcher.output
        assert f"A: {expected[QUESTIONS.index(CAPITAL)]!r}" in output, output
        urls = [launcher.url("prefill"), launcher.url("decode")]
        assert asyncio.run(_chat_all(urls)) == expected
        for role in ("prefill", "decode"):
            log = (tmp_path / f"{role}-{0 if role == 'prefill' else 1}.log").read_text()
            assert f"KV transfer engines ({role}): {protocol}\n" in log, log[-3000:]
    finally:
        code = launcher.interrupt()
    assert code == 0, launcher.process.stdout.read()


async def _chat_all(base_urls: list[str]) -> list[str]:
    clients = [openai.AsyncOpenAI(base_url=u, api_key="x", max_retries=0) for u in base_urls]

    async def one(index: int, question: str) -> str:
        reply = await clients[index % len(clients)].chat.completions.create(
            model=DEFAULT_MODEL_NAME, messages=messages(question), max_tokens=MAX_TOKENS,
            temperature=0,
        )  # fmt: skip
        return reply.choices[0].message.content

    try:
        return await asyncio.gather(*(one(i, q) for i, q in enumerate(QUESTIONS)))
    finally:
        for client in clients:
            await client.close()
