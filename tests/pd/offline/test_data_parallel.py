"""``LLM(data_parallel_size=2)`` with real engine processes: greedy float32 outputs equal
DP=1's and HF's, in the caller's order; requests spread by open work, a request's
choices stay on one rank; a bad prompt is refused before anything is queued;
``engine_worker_queue_port`` sets the ranks' channels and shutdown stops them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pd import LLM, SamplingParams
from pd.args import pick_free_port
from pd.offline.rank_processes import RankDied
from tests.pd.hf_reference import hf_greedy

PROMPTS = [
    "Hello world",
    "The cache moves layer by layer",
    "数据并行 is",
    "x",
    "Once upon a time, in a small village by the sea, there lived",
    "1 2 3 4 5 6 7 8 9 10 11 12",
]
MAX_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
SEEDED = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=MAX_NEW, ignore_eos=True)
ROOT = Path(__file__).resolve().parents[3]
OPTIONS = {"dtype": "float32", "max_model_len": 128, "seed": 0}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def queue_ports() -> list[int]:
    return [pick_free_port(), pick_free_port()]


@pytest.fixture(scope="module")
def llm(model_dir, queue_ports):
    ports = ",".join(map(str, queue_ports))  # as the FastDeploy docs write it
    with LLM(model=str(model_dir), data_parallel_size=2, engine_worker_queue_port=ports,
             **OPTIONS) as llm:  # fmt: skip
        processes = llm.backend.ranks.processes
        yield llm
    assert not any(process.is_alive() for process in processes)  # shutdown stopped them


@pytest.fixture(scope="module")
def single(model_dir):
    with LLM(model=str(model_dir), **OPTIONS) as single:
        yield single


@pytest.fixture(autouse=True)
def nothing_left_open(request):
    yield
    if "llm" in request.fixturenames:  # every engine request of the test was settled
        backend = request.getfixturevalue("llm").backend
        assert backend.open_tokens == {0: 0, 1: 0} and not backend._placed


def engines_took(llm: LLM) -> list[int]:
    """What each rank's engine says it took (its STATS, every 100 ms), once they settle."""
    links = llm.backend.ranks.links
    deadline = time.monotonic() + 5
    while True:
        llm.backend.ranks.poll(0.1)
        taken = [link.stats.num_requests_taken if link.stats else 0 for link in links]
        if (
            taken == [llm.requests_per_rank[f"dp{r}"] for r in (0, 1)]
            or time.monotonic() > deadline
        ):
            return taken


def rank_deltas(llm: LLM, before: dict[str, int]) -> list[int]:
    return [llm.requests_per_rank[name] - before[name] for name in ("dp0", "dp1")]


def test_outputs_equal_dp1_and_hf_in_order(llm, single, model_dir):
    assert llm.engine is None and single.engine is not None  # ranks in processes, and not
    before = llm.requests_per_rank
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.prompt for o in outputs] == PROMPTS
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert tokens == [o.outputs[0].token_ids for o in single.generate(PROMPTS, GREEDY)]
    token_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    assert tokens == hf_greedy(model_dir, token_ids, MAX_NEW)
    assert [o.outputs[0].text for o in outputs] == [
        llm.tokenizer.decode(t, skip_special_tokens=True) for t in tokens
    ]
    assert all(delta > 0 for delta in rank_deltas(llm, before))  # both ranks served


def test_requests_go_to_the_rank_with_least_open_work(llm):
    long_prompt = list(range(1, 101))  # 100 + 4 tokens of work on one rank...
    shorts = [[7, 8], [9], [10, 11, 12]]  # ...outweigh all three short ones on the other
    before = llm.requests_per_rank
    prompts = [{"prompt_token_ids": ids} for ids in [long_prompt, *shorts]]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4))
    assert [o.prompt_token_ids for o in outputs] == [long_prompt, *shorts]
    assert rank_deltas(llm, before) == [1, 3]
    assert engines_took(llm) == [llm.requests_per_rank["dp0"], llm.requests_per_rank["dp1"]]
    before = llm.requests_per_rank
    llm.generate([[5, 6], [7, 8], [9, 10], [11, 12]], GREEDY)  # equal work: they alternate
    assert rank_deltas(llm, before) == [2, 2]


def test_choices_of_a_request_stay_on_one_rank(llm, single):
    before = llm.requests_per_rank
    out = llm.generate(PROMPTS[1], SEEDED)[0]
    assert sorted(rank_deltas(llm, before)) == [0, 3]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    expected = single.generate(PROMPTS[1], SEEDED)[0]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in expected.outputs]


def test_stop_strings_end_requests_on_their_rank(llm, single):
    full = single.generate(PROMPTS[0], GREEDY)[0].outputs[0].text
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, stop=[full[3:6]])
    outputs = llm.generate(PROMPTS[:2], params)  # one per rank; the processor aborts them
    assert [o.outputs[0].text for o in outputs] == [
        o.outputs[0].text for o in single.generate(PROMPTS[:2], params)
    ]
    assert outputs[0].outputs[0].finish_reason == "stop"


def test_a_bad_prompt_is_refused_before_anything_is_queued(llm):
    before = llm.requests_per_rank
    with pytest.raises(ValueError, match=r"199 tokens.*max_model_len is 128"):
        llm.generate([PROMPTS[0], list(range(1, 200))], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**6]], GREEDY)
    assert llm.requests_per_rank == before
    assert llm.generate(PROMPTS[0], GREEDY)[0].finished  # still serving


def test_the_ranks_listen_on_the_given_ports(llm, queue_ports):
    addresses = [link.address for link in llm.backend.ranks.links]
    assert addresses == [f"tcp://127.0.0.1:{port}" for port in queue_ports]


@pytest.mark.slow
def test_dp2_with_tp2_equals_dp1(model_dir, single):
    with LLM(model=str(model_dir), data_parallel_size=2, tensor_parallel_size=2,
             **OPTIONS) as llm:  # fmt: skip
        outputs = llm.generate(PROMPTS, GREEDY)
        assert min(llm.requests_per_rank.values()) > 0
    expected = single.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]


def test_a_dead_rank_fails_the_call_with_its_exit_code(model_dir):
    with LLM(model=str(model_dir), data_parallel_size=2, **OPTIONS) as llm:
        processes = llm.backend.ranks.processes
        os.kill(processes[1].pid, signal.SIGKILL)
        processes[1].join(10)
        with pytest.raises(RankDied, match=r"DP rank 1 exited while running.*exit code -9"):
            llm.generate(PROMPTS[:2], GREEDY)
    assert not processes[0].is_alive()


@pytest.mark.slow
def test_an_llm_left_running_stops_its_ranks_when_the_process_exits(model_dir):
    script = (
        "from pd import LLM\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM(model={str(model_dir)!r}, data_parallel_size=2, dtype='float32')\n"
        "    print(*(p.pid for p in llm.backend.ranks.processes), flush=True)\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for pid in map(int, done.stdout.split()):
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
