"""The seeds' FastDeploy command lines, as pd-serve runs them (issue 15, item 3).

Parse tests take each command whole, at its own sizes (DP 8, DP 4, eight servers), and
assert what every DP rank gets and what the start-up log says. Start tests run the
commands that fit this machine as real processes (a real ``redis-server`` where the
scheduler is splitwise) and ask them with the official ``openai`` client, changed only
as ``tests/pd/seed_commands.py`` says (tiny model, DP 2, free ports). What each
looseness means here is decided in README.md, "FastDeploy's command lines":

- port lists longer than the DP ranks: the first ones are used, the rest logged;
- one ``--cache-queue-port``/``--pd-comm-port`` for several ranks: counted up, logged;
- ``--cache-queue-port`` (and a prefill's ``--pd-comm-port``): read, checked for
  clashes, logged as listened on by nothing;
- ``--enable-expert-parallel`` on dense models: logged as changing nothing;
- ``--num-gpu-blocks-override 256`` with ``--max-model-len 12288``: FastDeploy's blocks
  are 64 tokens, ours 16, so 256 blocks cannot hold one sequence: refused at parse
  time, naming ``--block-size 64`` (which the start test adds);
- the decode command's broken line continuation: a shell runs it without
  ``--splitwise-role decode``; the transfer ports it still has are then refused;
- ``--router``: every API server registers its own DP rank with ``pd-router``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from pd.api_servers import parse_multi_api_server, server_args
from pd.args import ServeArgs, parse_args
from pd.flag_notes import flag_notes
from proto import cluster_pb2 as cluster_pb
from scheduler.redis_server import EmbeddedRedis
from tests.pd.seed_commands import (
    DECODE,
    MULTI_API_SERVER_002,
    MULTI_API_SERVER_004,
    MULTI_API_SERVER_ROUTER,
    ONLINE_SPLITWISE,
    PREFILL,
    adapt,
    command,
    doc_argv,
    shell_argv,
)
from tests.pd.server_process import ServerProcess, start_command

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERT_PARALLEL_NOTE = (
    "--enable-expert-parallel: MoE layers split whole experts over every DP x TP rank; "
    "a dense model has none, so there it changes nothing"
)
CACHE_QUEUE_NOTE = "--cache-queue-port: nothing listens there"
BLOCKS_ERROR = (
    "pd-serve: error: --num-gpu-blocks-override 256 blocks of --block-size 16 tokens hold "
    "4096 tokens, fewer than one --max-model-len 12288 sequence: give more blocks, or "
    "blocks of at least 48 tokens (FastDeploy's blocks are 64 tokens: --block-size 64)"
)
FASTDEPLOY_BLOCKS = ["--block-size", "64"]  # the one flag the multi-API-server starts add


def error_line(capsys: pytest.CaptureFixture[str], parse, argv: list[str]) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def per_rank(args: ServeArgs, dest: str) -> list[list[int]]:
    return args.rank_ports(dest).per_rank


# ---- parse: each command at its own sizes ---------------------------------------------


def test_online_splitwise_dp8_gives_each_rank_its_queue_port():
    args = parse_args(doc_argv(ONLINE_SPLITWISE))
    assert (args.data_parallel_size, args.tensor_parallel_size) == (8, 1)
    assert (args.ports, args.metrics_port, args.splitwise_role) == ([8184], 8185, "mixed")
    assert per_rank(args, "engine_worker_queue_ports") == [[p] for p in range(6077, 6085)]
    scheduler = args.scheduler_config()
    assert (scheduler.name, scheduler.host, scheduler.port) == ("splitwise", "127.0.0.1", 6379)
    assert (scheduler.topic, scheduler.ttl_s) == ("test", 9000)
    assert flag_notes(args) == [EXPERT_PARALLEL_NOTE]


@pytest.mark.parametrize("text", [MULTI_API_SERVER_002, MULTI_API_SERVER_004])
def test_multi_api_server_as_typed_is_refused_for_its_block_count(capsys, text: str):
    """256 FastDeploy blocks hold 16,384 tokens; 256 of ours hold 4,096."""
    assert error_line(capsys, parse_multi_api_server, doc_argv(text)) == BLOCKS_ERROR


@pytest.mark.parametrize("text", [MULTI_API_SERVER_002, MULTI_API_SERVER_004])
def test_multi_api_server_gives_each_server_its_rank_and_ports(text: str):
    args = parse_multi_api_server(doc_argv(text) + FASTDEPLOY_BLOCKS)
    assert args.ports == [1811, 1822, 1833, 1844, 1855, 1866, 1877, 1888]
    assert (args.max_model_len, args.max_num_seqs, args.num_gpu_blocks_override) == (
        12288, 64, 256,
    )  # fmt: skip
    assert flag_notes(args) == [EXPERT_PARALLEL_NOTE]
    servers = [server_args(args, index, dp_rpc_port=29500) for index in range(8)]
    assert [s.ports for s in servers] == [[port] for port in args.ports]
    assert [s.metrics_port for s in servers] == [3101, 3201, 3301, 3401, 3501, 3601, 3701, 3801]
    assert [s.engine_worker_queue_ports for s in servers] == [
        [port] for port in range(25611, 25682, 10)
    ]
    assert [(s.data_parallel_start_rank, s.data_parallel_size_local) for s in servers] == [
        (rank, 1) for rank in range(8)
    ]
    assert {s.data_parallel_rpc_port for s in servers} == {29500}


def test_both_docs_multi_api_server_commands_are_the_same_instance():
    same = [parse_multi_api_server(doc_argv(t) + FASTDEPLOY_BLOCKS)
            for t in (MULTI_API_SERVER_002, MULTI_API_SERVER_004)]  # fmt: skip
    assert same[0] == same[1]


def test_router_variant_registers_every_server_with_the_router(capsys):
    argv = doc_argv(MULTI_API_SERVER_ROUTER)
    assert error_line(capsys, parse_multi_api_server, argv) == BLOCKS_ERROR
    args = parse_multi_api_server(argv + FASTDEPLOY_BLOCKS)
    assert args.router == ("0.0.0.0", 30000)
    assert all(server_args(args, i, 1).router == args.router for i in range(len(args.ports)))


def test_prefill_dp4_reads_its_loose_port_lists():
    """Eight queue and rdma ports for four ranks: the first four; one cache-queue and one
    pd-comm port: counted up; every derivation and every unused entry logged."""
    args = parse_args(doc_argv(PREFILL))
    assert (args.splitwise_role, args.data_parallel_size) == ("prefill", 4)
    assert args.cache_transfer_protocols == ["rdma", "ipc"]
    assert per_rank(args, "engine_worker_queue_ports") == [[25611], [25621], [25631], [25641]]
    assert per_rank(args, "cache_queue_ports") == [[8183], [8184], [8185], [8186]]
    assert per_rank(args, "pd_comm_ports") == [[2334], [2335], [2336], [2337]]
    assert per_rank(args, "rdma_comm_ports") == [[7671], [7672], [7673], [7674]]
    assert flag_notes(args) == [
        "--engine-worker-queue-port: 4 entries past the 4 used: 25651,25661,25671,25681",
        "--cache-queue-port 8183 for 4 ranks: 8183,8184,8185,8186",
        "--pd-comm-port 2334 for 4 ranks: 2334,2335,2336,2337",
        "--rdma-comm-ports: 4 entries past the 4 used: 7675,7676,7677,7678",
        EXPERT_PARALLEL_NOTE,
        "--cache-queue-port: nothing listens there; each DP rank's engine core reaches its "
        "TP workers over a channel of its own (a free port on 127.0.0.1)",
        "--pd-comm-port: nothing listens there; a prefill rank calls its decode ranks' "
        "pd-comm services and serves none",
    ]
    assert args.scheduler_config().topic == "test"


def test_decode_dp4_as_the_doc_means_it():
    """The doc's lines joined: a decode instance on topic "test", its pd-comm services on
    2334..2337 (one per DP rank)."""
    args = parse_args(doc_argv(DECODE))
    assert (args.splitwise_role, args.data_parallel_size) == ("decode", 4)
    assert args.scheduler_config().topic == "test"
    assert per_rank(args, "cache_queue_ports") == [[8187], [8188], [8189], [8190]]
    assert per_rank(args, "pd_comm_ports") == [[2334], [2335], [2336], [2337]]
    assert [note.split(":")[0].split()[0] for note in flag_notes(args)] == [
        "--engine-worker-queue-port", "--cache-queue-port", "--pd-comm-port",
        "--rdma-comm-ports", "--enable-expert-parallel", "--cache-queue-port",
    ]  # fmt: skip


DECODE_AS_A_SHELL_RUNS_IT = (
    "pd-serve: error: --pd-comm-port and --rdma-comm-ports are for --splitwise-role prefill "
    "or decode; this instance is mixed: --splitwise-role is left out (did the command line "
    "end early?)"
)


def test_decode_as_a_shell_runs_it_is_refused(capsys):
    """The shell drops ``--scheduler-topic "test" --splitwise-role "decode"``: left alone
    it would be a mixed instance on topic "default", beside a prefill that never sees a
    decode rank. Its pd-comm and rdma ports say that is not what was meant."""
    argv = shell_argv(DECODE)
    assert argv[-2:] == ["--scheduler-ttl", "9000"]
    assert error_line(capsys, parse_args, argv) == DECODE_AS_A_SHELL_RUNS_IT


def test_decode_pasted_into_bash_says_both_errors():
    """The doc's text through bash: pd-serve's one line, then bash's for the rest."""
    script = DECODE.replace(
        "python -m fastdeploy.entrypoints.openai.api_server", f"{sys.executable} -m pd.serve"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    lines = done.stderr.splitlines()
    assert lines[0] == DECODE_AS_A_SHELL_RUNS_IT
    assert lines[1].endswith("--scheduler-topic: command not found"), lines
    assert done.returncode == 127


# ---- start: the commands that fit this machine ----------------------------------------


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@contextlib.contextmanager
def running(text: str, argv: list[str], log_path: Path) -> Iterator[ServerProcess]:
    """The command started and ready; stopped at the end, which must be clean."""
    port = int(_value(argv, "--ports" if "--ports" in argv else "--port").split(",")[0])
    env = {**os.environ, "FD_ENABLE_MULTI_API_SERVER": "1"}  # as typed; pd-serve ignores it
    server = start_command(command(text, argv), log_path, port, env)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()[-4000:]
        assert "Traceback" not in server.log(), server.log()[-4000:]


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def ask(port: int, model: str) -> str:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                           max_retries=0, timeout=60)  # fmt: skip
    reply = client.completions.create(model=model, prompt="prefill decode cache", max_tokens=4,
                                      temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert reply.usage.completion_tokens == 4
    return reply.choices[0].text


def registered(redis_server: EmbeddedRedis, topic: str) -> list[tuple[str, int, int]]:
    """(role, DP rank, DP size) of every rank registered in ``topic``."""
    client = redis.Redis(port=redis_server.port)
    records = [cluster_pb.InstanceRecord.FromString(client.get(key))
               for key in client.scan_iter(match=f"{topic}:inst:*")]  # fmt: skip
    return sorted((r.role, r.dp_rank, r.dp_size) for r in records)


def test_online_splitwise_at_dp2_answers(tiny_model, redis_server, tmp_path):
    model = str(tiny_model("qwen2"))
    argv = adapt(doc_argv(ONLINE_SPLITWISE), model, 2, redis_server.port)
    with running(ONLINE_SPLITWISE, argv, tmp_path / "online.log") as server:
        assert ask(server.port, model)
        assert registered(redis_server, "test") == [("mixed", 0, 2), ("mixed", 1, 2)]
        log = server.log()
        unused = _value(argv, "--engine-worker-queue-port").split(",")[2:]
        assert f"--engine-worker-queue-port: 6 entries past the 2 used: {','.join(unused)}" in log
        assert EXPERT_PARALLEL_NOTE in log


def test_multi_api_server_at_two_servers_answers_on_each(tiny_model, tmp_path):
    model = str(tiny_model("qwen2", max_position_embeddings=16384))  # the seed's 12288 fits
    argv = adapt(doc_argv(MULTI_API_SERVER_004), model, 2) + FASTDEPLOY_BLOCKS
    with running(MULTI_API_SERVER_004, argv, tmp_path / "multi.log") as launcher:
        ports = [int(port) for port in _value(argv, "--ports").split(",")]
        assert all(ask(port, model) for port in ports)
        assert "pd-serve ready: 2 API servers, one per DP rank" in launcher.log()
        assert "--engine-worker-queue-port: 6 entries past the 2 used" in launcher.log()


def test_multi_api_server_whose_servers_fail_to_start_exits_1(tiny_model, tmp_path):
    """Was 0: a spawned server's return code was dropped. Here the model's context (1024)
    is shorter than the command's --max-model-len 12288, so each engine refuses."""
    argv = adapt(doc_argv(MULTI_API_SERVER_004), str(tiny_model("qwen2")), 2) + FASTDEPLOY_BLOCKS
    done = subprocess.run(command(MULTI_API_SERVER_004, argv), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr[-4000:]
    assert "is larger than the model's max_position_embeddings (1024)" in done.stderr


@pytest.mark.slow
def test_prefill_and_decode_at_dp2_answer(tiny_model, redis_server, tmp_path):
    """Both instances on this host (the doc's are on two): each gets its own free ports."""
    model = str(tiny_model("qwen2"))
    taken: set[int] = set()
    prefill = adapt(doc_argv(PREFILL), model, 2, redis_server.port, taken)
    decode = adapt(doc_argv(DECODE), model, 2, redis_server.port, taken)
    with (
        running(PREFILL, prefill, tmp_path / "prefill.log") as prefill_server,
        running(DECODE, decode, tmp_path / "decode.log") as decode_server,
    ):
        assert registered(redis_server, "test") == [
            ("decode", 0, 2), ("decode", 1, 2), ("prefill", 0, 2), ("prefill", 1, 2),
        ]  # fmt: skip
        assert ask(prefill_server.port, model) == ask(decode_server.port, model)
        base = int(_value(prefill, "--pd-comm-port"))
        assert f"--pd-comm-port {base} for 2 ranks: {base},{base + 1}" in prefill_server.log()
        assert CACHE_QUEUE_NOTE in decode_server.log()
