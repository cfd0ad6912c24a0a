"""Tensor parallelism on CPU (gloo, real worker processes): greedy float32 tokens equal
HF transformers' for llama, qwen2 and qwen3, offline and through ``pd-serve``, with
chunked prefill, prefix-cache hits and preemption; a killed worker ends its instance
with an explained error and leaves no process behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import openai
import pytest

from engine.tokenizer import load_tokenizer
from pd import LLM, SamplingParams
from tests.pd.hf_reference import hf_greedy
from tests.pd.server_process import (
    ServerProcess,
    spawned_children,
    start_server,
    stream_in_background,
)

MAX_NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog",
    "def add(a, b):\n    return a + b",
    "Once upon a time, in a small village by the sea, there lived",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "Café au lait, crème brûlée and a piñata 🎉",
]


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def stress_llm(model_dir: Path, **llm_kwargs) -> LLM:
    """Small blocks, a small pool and a small token budget: the batch below preempts,
    prefills in chunks and hits the prefix cache."""
    return LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=64,
        block_size=4,
        num_gpu_blocks_override=24,
        max_num_batched_tokens=16,
        **llm_kwargs,
    )


def check_stress_batch(llm: LLM, model_dir: Path) -> None:
    token_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    shared = token_ids[3]
    token_ids += [shared + ids[:4] for ids in token_ids[:4]]  # prefix hits on `shared`
    token_ids = [ids for ids in token_ids if len(ids) <= 64 - MAX_NEW]
    assert max(len(ids) for ids in token_ids) > 16  # some prompt takes several chunks
    reference = hf_greedy(model_dir, token_ids, MAX_NEW)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_prefix_hit_tokens > 0
    engine.block_manager.check_invariants(live=[])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tp2_matches_hf(tiny_model, arch):
    model_dir = tiny_model(arch)
    with stress_llm(model_dir, tensor_parallel_size=2) as llm:
        workers = llm.engine.executor.processes
        assert [p.is_alive() for p in workers] == [True]
        check_stress_batch(llm, model_dir)
    assert not any(p.is_alive() for p in workers)  # shutdown stopped them


@pytest.mark.slow
def test_tp4_replicates_kv_heads_and_matches_hf(tiny_model):
    """4 ranks over 2 KV heads: each head lives on two ranks."""
    model_dir = tiny_model("llama")
    with stress_llm(model_dir, tensor_parallel_size=4) as llm:
        assert llm.engine.executor.kv_layout.num_kv_heads == 1
        check_stress_batch(llm, model_dir)


def serve_tp2(model_dir: Path, log: Path) -> ServerProcess:
    return start_server(model_dir, log, "--tensor-parallel-size", "2", "--max-model-len", "512")


def check_answers_match_hf(server: ServerProcess, model_dir: Path) -> openai.OpenAI:
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    completions = [
        client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=MAX_NEW,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        for prompt in PROMPTS
    ]
    tokenizer = load_tokenizer(str(model_dir))
    reference = hf_greedy(model_dir, [tokenizer.encode(p) for p in PROMPTS], MAX_NEW)
    expected = [tokenizer.decode(ids, skip_special_tokens=True) for ids in reference]
    assert [c.choices[0].text for c in completions] == expected
    return client


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_serve_tp2_matches_hf(tiny_model, tmp_path, arch):
    model_dir = tiny_model(arch)
    server = serve_tp2(model_dir, tmp_path / "server.log")
    try:
        check_answers_match_hf(server, model_dir)
    finally:
        assert server.stop() == 0, server.log()


def test_serve_tp2_matches_hf_then_a_killed_worker_ends_the_instance(tiny_model, tmp_path):
    model_dir = tiny_model("qwen3")
    server = serve_tp2(model_dir, tmp_path / "server.log")
    try:
        client = check_answers_match_hf(server, model_dir)
        model = client.models.list().data[0].id

        for rank in ("0", "1"):  # stats arrive every 0.1 s
            assert server.metric("pd:tp_worker_up", f'tp_rank="{rank}"') == 1.0

        engine_pid = server.engine_pid()
        workers = spawned_children(engine_pid)
        assert len(workers) == 1
        stream = stream_in_background(client, model, "Crash", 480)
        os.kill(workers[0], signal.SIGKILL)
        stream.wait_end(15)
        assert stream.errors, "the stream ended without an error"
        assert 0 < len(stream.chunks) < 480
        assert server.process.wait(15) != 0
        log = server.log()
        assert f"TP worker 1 (pid {workers[0]}) exited with code -9" in log
        assert not is_running(engine_pid)
        assert not any(is_running(pid) for pid in workers)
    finally:
        server.stop()
