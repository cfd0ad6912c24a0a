"""``pd-bench``: pure statistics on synthetic records, prompts, arrivals, flags, the
streaming client against fake transports, and whole runs as a subprocess (against
an unreachable address, and against a real ``pd-serve`` on a tiny model)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer, models

from pd.args import pick_free_port
from pd.bench import client as bench_client
from pd.bench.config import BenchConfig, parse_config
from pd.bench.dataset import BenchPrompt, load_vocabulary, make_prompts, sample_len
from pd.bench.progress import ProgressBar
from pd.bench.record import RequestRecord
from pd.bench.report import format_table, result_document
from pd.bench.runner import arrival_times
from pd.bench.stats import Distribution, Slo, meets_slo, percentile, summarize
from tests.pd.server_process import start_server

BASE_URL = "http://bench.test/v1"


def ok(
    index: int = 0,
    ttft_s: float = 0.1,
    latency_s: float = 1.0,
    num_output_tokens: int = 10,
    num_prompt_tokens: int = 20,
    itl_s: tuple[float, ...] = (0.1,),
) -> RequestRecord:
    return RequestRecord(
        index=index,
        is_success=True,
        num_prompt_tokens=num_prompt_tokens,
        num_output_tokens=num_output_tokens,
        ttft_s=ttft_s,
        latency_s=latency_s,
        itl_s=list(itl_s),
    )


def config(**overrides: Any) -> BenchConfig:
    settings: dict[str, Any] = dict(base_url=BASE_URL, num_prompts=4, input_len=8, output_len=4)
    return BenchConfig(**{**settings, **overrides})


# -- statistics -----------------------------------------------------------------


def test_percentile_interpolates_between_ranks():
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile(values, 100) == 10.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for size in (2, 5, 101):
        values = rng.exponential(size=size).tolist()
        for q in (1, 25, 50, 90, 99, 99.9):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], -1), ([1.0], 100.5)])
def test_percentile_rejects_bad_input(values, q):
    with pytest.raises(ValueError):
        percentile(values, q)


def test_distribution_is_in_milliseconds_and_none_when_empty():
    distribution = Distribution.of_seconds([0.001, 0.002, 0.003])
    assert distribution == Distribution(mean=2.0, p50=2.0, p90=2.8, p99=pytest.approx(2.98))
    assert Distribution.of_seconds([]) is None


def test_tpot_excludes_the_first_token():
    assert ok(ttft_s=0.2, latency_s=1.0, num_output_tokens=5).tpot_s == pytest.approx(0.2)
    assert ok(num_output_tokens=1).tpot_s is None
    assert RequestRecord.failed(0, "boom").tpot_s is None


def test_summary_counts_only_successful_requests():
    records = [
        ok(0, ttft_s=0.1, latency_s=1.0, num_output_tokens=10, itl_s=(0.1, 0.2)),
        ok(1, ttft_s=0.3, latency_s=2.0, num_output_tokens=18, itl_s=(0.3,)),
        RequestRecord.failed(2, "HTTP 503: overloaded"),
        RequestRecord.failed(3, "HTTP 503: overloaded"),
        RequestRecord.failed(4, "timed out after 1 s"),
    ]
    summary = summarize(records, duration_s=4.0)
    assert (summary.num_success, summary.num_failed) == (2, 3)
    assert summary.num_input_tokens == 40
    assert summary.num_output_tokens == 28
    assert summary.request_throughput == 0.5
    assert summary.input_throughput == 10.0
    assert summary.output_throughput == 7.0
    assert summary.ttft_ms.mean == pytest.approx(200.0)
    assert summary.tpot_ms.mean == pytest.approx(100.0)  # 0.9/9 and 1.7/17
    assert summary.itl_ms.p50 == pytest.approx(200.0)  # every gap of every request
    assert summary.e2e_ms.p99 == pytest.approx(1990.0)
    assert summary.errors == {"HTTP 503: overloaded": 2, "timed out after 1 s": 1}
    assert summary.slo is None and summary.goodput is None and summary.num_good is None


def test_all_failed_summary_has_no_latencies():
    summary = summarize([RequestRecord.failed(0, "refused")], duration_s=0.0)
    assert summary.num_success == 0 and summary.request_throughput == 0.0
    assert summary.ttft_ms is None and summary.e2e_ms is None


def test_goodput_needs_every_given_objective():
    fast = ok(0, ttft_s=0.05, latency_s=0.5, num_output_tokens=10)  # TPOT 50 ms
    slow_start = ok(1, ttft_s=0.5, latency_s=0.9, num_output_tokens=10)  # TPOT ~44 ms
    slow_tokens = ok(2, ttft_s=0.05, latency_s=2.0, num_output_tokens=10)  # TPOT ~217 ms
    one_token = ok(3, ttft_s=0.05, latency_s=0.05, num_output_tokens=1)  # no TPOT
    failed = RequestRecord.failed(4, "refused")
    records = [fast, slow_start, slow_tokens, one_token, failed]
    both = Slo(ttft_ms=100, tpot_ms=50)
    assert [meets_slo(r, both) for r in records] == [True, False, False, True, False]
    assert [meets_slo(r, Slo(ttft_ms=100)) for r in records] == [True, False, True, True, False]
    assert [meets_slo(r, Slo(tpot_ms=50)) for r in records] == [True, True, False, True, False]
    summary = summarize(records, duration_s=2.0, slo=both)
    assert summary.num_good == 2
    assert summary.goodput == 1.0


# -- prompts and arrivals ---------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer: 50 ordinary words and two special tokens."""
    vocab = {f"w{i}": i for i in range(50)} | {"[UNK]": 50}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.add_special_tokens(["<eos>", "<bos>"])
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def prompts_of(seed: int = 0, vocabulary=None, as_token_ids: bool = True) -> list[BenchPrompt]:
    return make_prompts(
        num_prompts=50,
        input_len=20,
        input_len_range=0.5,
        output_len=8,
        output_len_range=0.25,
        seed=seed,
        vocabulary=vocabulary,
        as_token_ids=as_token_ids,
    )


def test_prompts_are_seeded_token_ids_of_exact_length(tokenizer_path):
    vocabulary = load_vocabulary(tokenizer_path.parent)
    prompts = prompts_of(vocabulary=vocabulary)
    assert prompts == prompts_of(vocabulary=vocabulary)
    assert prompts != prompts_of(seed=1, vocabulary=vocabulary)
    special_ids = set(vocabulary.tokenizer.get_added_tokens_decoder())
    assert len(special_ids) == 2
    for prompt in prompts:
        assert isinstance(prompt.prompt, list) and len(prompt.prompt) == prompt.prompt_len
        assert 10 <= prompt.prompt_len <= 30
        assert 6 <= prompt.output_len <= 10
        assert not special_ids & set(prompt.prompt)
    assert len({p.prompt_len for p in prompts}) > 5


def test_prompts_without_token_ids_are_words(tokenizer_path):
    vocabulary = load_vocabulary(tokenizer_path)
    for prompt in prompts_of(vocabulary=vocabulary, as_token_ids=False):
        assert isinstance(prompt.prompt, str)
        assert len(vocabulary.tokenizer.encode(prompt.prompt).ids) <= prompt.prompt_len
    for prompt in prompts_of(vocabulary=None):
        assert isinstance(prompt.prompt, str) and len(prompt.prompt.split()) == prompt.prompt_len


def test_load_vocabulary_says_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        load_vocabulary(tmp_path)


def test_sample_len_stays_in_range_and_positive():
    rng = random.Random(0)
    assert {sample_len(rng, 10, 0.0) for _ in range(20)} == {10}
    assert {sample_len(rng, 10, 0.2) for _ in range(500)} == set(range(8, 13))
    assert min(sample_len(rng, 1, 0.9) for _ in range(100)) == 1


def test_arrivals_are_seeded_poisson():
    assert arrival_times(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
    times = arrival_times(4000, 50.0, seed=0)
    assert times == arrival_times(4000, 50.0, seed=0)
    assert times != arrival_times(4000, 50.0, seed=1)
    assert times[0] == 0.0 and times == sorted(times)
    assert times[-1] / (len(times) - 1) == pytest.approx(1 / 50.0, rel=0.1)


# -- flags ----------------------------------------------------------------------------


REQUIRED = ["--base-url", BASE_URL, "--num-prompts", "4", "--input-len", "8", "--output-len", "2"]


@pytest.mark.parametrize(
    "bad",
    [
        ["--num-prompts", "0"],
        ["--base-url", "localhost:8000"],
        ["--request-rate", "0"],
        ["--request-rate", "nan"],
        ["--max-concurrency", "0"],
        ["--input-len-range", "1.0"],
        ["--slo-ttft-ms", "-5"],
        ["--request-timeout", "inf"],
        ["--endpoint", "embeddings"],
    ],
)
def test_bad_flags_exit_2_with_the_reason(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config([*REQUIRED, *bad])
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_flags_become_the_config():
    parsed = parse_config([*REQUIRED, "--slo-tpot-ms", "40", "--no-progress"])
    assert parsed == config(output_len=2, slo_tpot_ms=40.0, show_progress=False)
    assert parsed.request_rate == math.inf and parsed.slo == Slo(tpot_ms=40.0)
    assert parsed.endpoint_url == BASE_URL + "/completions"


# -- the streaming client ---------------------------------------------------------


def sse(*events: Any) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


def send_to(handler: Callable, **overrides: Any) -> RequestRecord:
    async def go() -> RequestRecord:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport) as client:
            prompt = BenchPrompt([1, 2, 3], 3, 4)
            return await bench_client.send(client, config(**overrides), "m", 7, prompt, 0.0)

    return asyncio.run(go())


def streaming(body: bytes, status: int = 200) -> Callable:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    return handler


def test_completion_stream_is_timed_and_uses_the_usage_chunk():
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        chunks = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in "ab"]
        last = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
        return streaming(sse(*chunks, last, usage, "[DONE]"))(request)

    record = send_to(handler)
    assert seen[0]["prompt"] == [1, 2, 3] and seen[0]["max_tokens"] == 4
    assert seen[0]["ignore_eos"] is True and seen[0]["stream_options"] == {"include_usage": True}
    assert record.is_success and record.index == 7 and record.error is None
    assert (record.num_prompt_tokens, record.num_output_tokens) == (3, 4)
    assert len(record.itl_s) == 2  # three output chunks
    assert 0 <= record.ttft_s <= record.latency_s


def test_chat_stream_without_usage_counts_output_chunks():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    words = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in ("hi", " there")]
    record = send_to(streaming(sse(role, *words, "[DONE]")), endpoint="chat")
    assert record.is_success
    assert (record.num_prompt_tokens, record.num_output_tokens) == (3, 2)
    assert len(record.itl_s) == 1


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b'{"error": {"message": "no such model"}}', 404, "HTTP 404: no such model"),
        (b"gateway down", 502, "HTTP 502: gateway down"),
        (sse({"error": {"message": "engine died"}}, "[DONE]"), 200, "error in stream: engine died"),
        (sse({"choices": [{"text": "a"}]}), 200, "ended without [DONE]"),
        (sse("[DONE]"), 200, "the stream ended without output"),
        (b"data: {not json\n\n", 200, "JSONDecodeError"),
    ],
)
def test_failures_are_records_with_their_reason(body, status, reason):
    record = send_to(streaming(body, status))
    assert not record.is_success
    assert reason in record.error


def test_a_request_past_its_timeout_fails():
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200)

    started = time.monotonic()
    record = send_to(handler, request_timeout_s=0.2)
    assert record.error == "timed out after 0.2 s"
    assert time.monotonic() - started < 2


# -- report and progress ----------------------------------------------------------------


def test_report_table_and_json_document():
    records = [ok(0), ok(1, num_output_tokens=1), RequestRecord.failed(2, "refused")]
    bench = config(slo_ttft_ms=200.0, api_key="secret", result_json=Path("out.json"))
    summary = summarize(records, 1.0, bench.slo)
    table = format_table(bench, "m", summary)
    assert "Successful requests:" in table and "Goodput (req/s):" in table
    assert "meeting TTFT <= 200 ms" in table and "1 x refused" in table
    assert all(len(line) == len(table.splitlines()[0]) for line in table.splitlines()[:10])
    long_name = "/models/" + "x" * 80
    assert f"Model: {long_name}" in format_table(bench, long_name, summary)
    document = result_document(bench, "m", summary, records)
    document = json.loads(json.dumps(document, allow_nan=False))
    assert document["config"]["request_rate"] == "inf"
    assert document["config"]["api_key"] == "<redacted>"
    assert document["summary"]["goodput"] == 2.0
    assert [r["tpot_s"] for r in document["requests"]] == [pytest.approx(0.1), None, None]


def test_progress_bar_writes_its_last_state_once():
    stream = io.StringIO()
    progress = ProgressBar(3, stream=stream)
    for is_success in (True, False, True):
        progress.advance(is_success)
    progress.close()
    assert stream.getvalue().count("\n") == 1
    assert "3/3 (1 failed)" in stream.getvalue()
    silent = io.StringIO()
    progress = ProgressBar(1, enabled=False, stream=silent)
    progress.advance(True)
    progress.close()
    assert silent.getvalue() == ""


# -- whole runs -----------------------------------------------------------------------------


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pd.bench", "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("model_flag", [[], ["--model", "m"]])
def test_unreachable_server_fails_every_request_quickly(model_flag, tmp_path):
    result_path = tmp_path / "result.json"
    base_url = f"http://127.0.0.1:{pick_free_port()}/v1"
    started = time.monotonic()
    run = bench("--base-url", base_url, *model_flag, "--num-prompts", "3", "--input-len", "4",
                "--output-len", "2", "--result-json", str(result_path))  # fmt: skip
    assert time.monotonic() - started < 10
    assert run.returncode == 1, run.stderr
    assert "Failed requests:" in run.stdout and "ConnectError" in run.stdout
    result = json.loads(result_path.read_text())
    assert result["summary"]["num_failed"] == 3
    assert all("ConnectError" in r["error"] for r in result["requests"])


def test_bad_tokenizer_flag_exits_2(tmp_path):
    run = bench(*REQUIRED, "--tokenizer", str(tmp_path))
    assert run.returncode == 2
    assert "--tokenizer" in run.stderr


@pytest.mark.slow
def test_against_a_real_server(tiny_model, tmp_path):
    server = start_server(tiny_model("qwen2"), tmp_path / "server.log")
    try:
        result_path = tmp_path / "result.json"
        run = bench("--base-url", server.base_url, "--num-prompts", "12", "--max-concurrency",
                    "4", "--input-len", "16", "--output-len", "8", "--slo-ttft-ms", "60000",
                    "--slo-tpot-ms", "60000", "--result-json", str(result_path))  # fmt: skip
        chat = bench("--base-url", server.base_url, "--endpoint", "chat", "--num-prompts", "3",
                     "--request-rate", "20", "--input-len", "16", "--output-len", "4")  # fmt: skip
    finally:
        assert server.stop() == 0, server.log()[-4000:]
    assert run.returncode == 0, run.stdout + run.stderr
    assert chat.returncode == 0, chat.stdout + chat.stderr
    assert "Successful requests:                                   3" in chat.stdout
    result = json.loads(result_path.read_text())
    summary, records = result["summary"], result["requests"]
    assert (summary["num_success"], summary["num_failed"]) == (12, 0)
    assert summary["num_input_tokens"] == 12 * 16  # token-id prompts: exact lengths
    assert all(r["num_output_tokens"] == 8 and r["num_prompt_tokens"] == 16 for r in records)
    assert all(0 < r["ttft_s"] <= r["latency_s"] for r in records)
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        latency = summary[name]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"], name
    assert summary["num_good"] == 12
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])
    assert result["config"]["max_concurrency"] == 4
