"""``pd-serve`` flags: defaults, parsing, one-line errors, fast --help."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pd.args import ServeArgs, build_parser, parse_args, pick_free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def argv(text: str) -> list[str]:
    return text.split()


# The flags of issue 3, as FastDeploy / vLLM users type them.
ALL_FLAGS = argv(
    """
--model --served-model-name --host --port --metrics-port --splitwise-role
--tensor-parallel-size --data-parallel-size --enable-expert-parallel --max-model-len
--max-num-seqs --max-num-batched-tokens --num-gpu-blocks-override --block-size --dtype
--device --load-format --enable-prefix-caching --no-enable-prefix-caching --seed
--gpu-memory-utilization --max-waiting-requests --engine-worker-queue-port
--cache-queue-port --cache-transfer-protocol --rdma-comm-ports --pd-comm-port
--scheduler-name --scheduler-host --scheduler-port --scheduler-db --scheduler-password
--scheduler-topic --scheduler-ttl --scheduler-expire-period --router --ports
--metrics-ports --api-key --log-level --engine-threads --cluster-secret-file
"""
)


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run parse_args expecting exit 2; return the one stderr line."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("pd-serve: error: ")
    return lines[0]


def test_defaults_match_the_dataclass():
    args = parse_args(["--model", "/m"])
    assert args == ServeArgs(model="/m", served_model_name=["/m"])
    assert args.host == "0.0.0.0"
    assert args.api_port == 8000
    assert args.metrics_port is None and args.metrics_ports is None
    assert args.splitwise_role == "mixed" and args.scheduler_name == "local"
    assert (args.tensor_parallel_size, args.data_parallel_size) == (1, 1)
    assert args.max_num_seqs == 256 and args.block_size == 16
    assert args.max_model_len is None and args.max_num_batched_tokens is None
    assert args.enable_prefix_caching is True and args.enable_expert_parallel is False
    assert args.gpu_memory_utilization == 0.9 and args.max_waiting_requests == 1024
    assert args.engine_worker_queue_ports == [0]  # 0: picked free at start-up
    assert args.cache_queue_ports == args.pd_comm_ports == args.rdma_comm_ports == [0]
    assert args.cache_transfer_protocols == ["ipc", "tcp"]
    assert (args.scheduler_ttl, args.scheduler_expire_period) == (900, 3000)
    assert (args.scheduler_host, args.scheduler_port, args.scheduler_topic) == (
        "127.0.0.1",
        6379,
        "default",
    )
    assert args.router is None and args.api_key is None and args.log_level == "info"


def test_parser_knows_every_flag():
    known = build_parser()._option_string_actions
    assert [flag for flag in ALL_FLAGS if flag not in known] == []


def test_every_supported_flag_parses():
    args = parse_args(
        argv(
            "--model /m --served-model-name a b --host 127.0.0.1 --port 0 --metrics-port 9100 "
            "--max-model-len 512 --max-num-seqs 8 --max-num-batched-tokens 1024 "
            "--num-gpu-blocks-override 64 --block-size 32 --dtype float32 --device cpu "
            "--load-format dummy --no-enable-prefix-caching --seed 7 "
            "--gpu-memory-utilization 0.5 --max-waiting-requests 3 "
            "--engine-worker-queue-port 25611 "
            "--scheduler-name local "
            "--ports 0 --api-key sk-x --log-level DEBUG --tensor-parallel-size 1 "
            "--data-parallel-size 1 --splitwise-role mixed --engine-threads 3"
        )
    )
    assert args.served_model_name == ["a", "b"]
    assert (args.host, args.api_port, args.metrics_port) == ("127.0.0.1", 0, 9100)
    assert (args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens) == (512, 8, 1024)
    assert (args.num_gpu_blocks_override, args.block_size) == (64, 32)
    assert (args.dtype, args.device, args.load_format, args.seed) == ("float32", "cpu", "dummy", 7)
    assert args.enable_prefix_caching is False
    assert (args.gpu_memory_utilization, args.max_waiting_requests) == (0.5, 3)
    assert args.engine_worker_queue_ports == [25611]
    assert (args.api_key, args.log_level) == ("sk-x", "debug")
    assert args.engine_threads == 3


def test_later_issue_flags_parse_before_they_are_rejected():
    namespace = build_parser().parse_args(
        argv(
            "--model /m --tensor-parallel-size 2 --data-parallel-size 4 --enable-expert-parallel "
            "--splitwise-role prefill --cache-transfer-protocol RDMA,ipc,rdma "
            "--cache-queue-port 8183 --rdma-comm-ports 7671,7672 --pd-comm-port 2334 "
            "--scheduler-name splitwise --scheduler-host 10.0.0.2 --scheduler-port 6380 "
            "--scheduler-db 2 --scheduler-password pw --scheduler-topic test "
            "--router [::1]:30000 --metrics-ports 3101,3201"
        )
    )
    assert namespace.cache_transfer_protocols == ["rdma", "ipc"]
    assert namespace.cache_queue_ports == [8183]
    assert namespace.rdma_comm_ports == [7671, 7672]
    assert namespace.pd_comm_ports == [2334]
    assert namespace.router == ("::1", 30000)
    assert namespace.metrics_ports == [3101, 3201]
    assert (namespace.scheduler_port, namespace.scheduler_db) == (6380, 2)


@pytest.mark.parametrize(
    ("text", "ports"),
    [("8001", [8001]), ("8001,8002", [8001, 8002]), (" 8001 , 0 ", [8001, 0])],
)
def test_port_lists_parse(text: str, ports: list[int]):
    namespace = build_parser().parse_args(["--model", "/m", "--ports", text])
    assert namespace.ports == ports


def test_port_and_ports_may_agree():
    assert parse_args(["--model", "/m", "--port", "8001", "--ports", "8001"]).api_port == 8001
    assert parse_args(["--model", "/m", "--ports", "8002"]).api_port == 8002


INVALID = [
    (["--port", "70000"], "argument --port: port 70000 is outside 0..65535"),
    (["--port", "-1"], "argument --port: port -1 is outside"),
    (["--ports", "80a1"], "argument --ports: '80a1' is not a port number"),
    (["--ports", "8001,,8002"], "argument --ports: '8001,,8002' has an empty entry"),
    (["--max-num-seqs", "0"], "argument --max-num-seqs: must be >= 1, got 0"),
    (["--block-size", "x"], "argument --block-size: 'x' is not an integer"),
    (["--data-parallel-size", "0"], "argument --data-parallel-size: must be >= 1"),
    (["--gpu-memory-utilization", "0"], "argument --gpu-memory-utilization: must be in (0, 1]"),
    (["--gpu-memory-utilization", "1.5"], "must be in (0, 1], got 1.5"),
    (["--scheduler-ttl", "0"], "argument --scheduler-ttl: must be >= 1"),
    (["--scheduler-expire-period", "-5"], "argument --scheduler-expire-period: must be >= 1"),
    (["--cache-transfer-protocol", "rdma,nvlink"], "unknown protocol 'nvlink'"),
    (["--router", "localhost"], "argument --router: 'localhost' is not host:port"),
    (["--router", "h:0"], "argument --router: port 0 in 'h:0' is outside 1..65535"),
    (["--splitwise-role", "both"], "argument --splitwise-role: invalid choice: 'both'"),
    (["--device", "tpu"], "argument --device: 'tpu' is not one of auto, cpu, cuda"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--engine-threads", "-1"], "argument --engine-threads: must be >= 0"),
    (["--ports", "8001,8002"], "--ports has 2 ports for 1 DP rank"),
    (
        ["--data-parallel-size", "3", "--engine-worker-queue-port", "1,2"],
        "--engine-worker-queue-port has 2 ports; give one per DP rank (3), or one to count",
    ),
    (
        ["--data-parallel-size", "2", "--ports", "8001,8002", "--metrics-ports", "9001"],
        "--metrics-ports has 1 port for 2 API servers (--ports)",
    ),
    (
        ["--tensor-parallel-size", "3", "--rdma-comm-ports", "7671,7672"],
        "--rdma-comm-ports has 2 ports; give one per GPU (3)",
    ),
    (
        [
            "--data-parallel-size",
            "4",
            "--data-parallel-start-rank",
            "3",
            "--data-parallel-size-local",
            "2",
        ],
        "--data-parallel-start-rank 3 with --data-parallel-size-local 2 runs DP ranks past",
    ),
    (
        ["--data-parallel-size", "4", "--data-parallel-start-rank", "2"],
        "the others need a meeting point, --data-parallel-address and --data-parallel-rpc-port",
    ),
    (
        ["--data-parallel-size", "2", "--engine-worker-queue-port", "65535"],
        "--engine-worker-queue-port 65535 counted up for 2 DP ranks reaches 65536, past 65535",
    ),
    (["--port", "8001", "--ports", "8002"], "--port 8001 disagrees with --ports 8002"),
    (["--metrics-port", "8000"], "port 8000 is used by --port and --metrics-port"),
    (
        ["--data-parallel-size", "2", "--ports", "8001,8001"],
        "port 8001 is used twice in --ports",
    ),
    (
        ["--splitwise-role", "decode"],
        "--splitwise-role decode with --scheduler-name local needs "
        "--scheduler-name splitwise or --router",
    ),
    (
        ["--num-gpu-blocks-override", "16", "--max-model-len", "512"],
        "--num-gpu-blocks-override 16 blocks of --block-size 16 tokens hold 256 tokens, "
        "fewer than one --max-model-len 512 sequence: give more blocks, or blocks of at "
        "least 32 tokens",
    ),
    (
        ["--pd-comm-port", "2334"],
        "--pd-comm-port is for --splitwise-role prefill or decode; this instance is mixed: "
        "--splitwise-role is left out (did the command line end early?)",
    ),
    (
        ["--splitwise-role", "mixed", "--rdma-comm-ports", "7671"],
        "--rdma-comm-ports is for --splitwise-role prefill or decode; this instance is mixed "
        "(--splitwise-role mixed)",
    ),
]


@pytest.mark.parametrize(("extra", "message"), INVALID)
def test_invalid_flags_exit_2_with_one_line(capsys, extra: list[str], message: str):
    assert message in error_line(capsys, ["--model", "/m", *extra])


def test_model_is_required(capsys):
    assert "required: --model" in error_line(capsys, ["--port", "8001"])


def test_the_seeds_splitwise_flags_parse():
    """FastDeploy's prefill/decode example, at one DP rank, is accepted as typed."""
    args = parse_args([
        "--model", "/m", "--port", "8180", "--metrics-port", "8181",
        "--engine-worker-queue-port", "25611", "--cache-queue-port", "8183",
        "--cache-transfer-protocol", "rdma,ipc", "--rdma-comm-ports", "7671",
        "--pd-comm-port", "2334", "--splitwise-role", "prefill", "--scheduler-name", "splitwise",
        "--scheduler-host", "127.0.0.1", "--scheduler-port", "6379", "--scheduler-topic", "test",
        "--scheduler-ttl", "9000",
    ])  # fmt: skip
    assert args.splitwise_role == "prefill"
    assert args.cache_transfer_protocols == ["rdma", "ipc"]
    assert (args.pd_comm_ports, args.rdma_comm_ports) == ([2334], [7671])
    config = args.scheduler_config()
    assert (config.name, config.topic, config.ttl_s) == ("splitwise", "test", 9000)


def test_a_role_behind_the_router_is_paired_by_it_without_redis(capsys):
    args = parse_args(["--model", "/m", "--router", "10.0.0.1:30000", "--splitwise-role",
                       "prefill"])  # fmt: skip
    assert args.paired_by_router and args.scheduler_name == "local"
    assert not parse_args(["--model", "/m", "--router", "10.0.0.1:30000"]).paired_by_router
    line = error_line(capsys, ["--model", "/m", "--router", "h:1", "--splitwise-role", "decode",
                               "--scheduler-name", "splitwise"])  # fmt: skip
    assert "without Redis: leave out --scheduler-name splitwise" in line


def test_combinations_that_can_never_work_are_refused(capsys):
    line = error_line(capsys, ["--model", "/m", "--router", "h:1", "--ports", "1,2"])
    assert "--ports has 2 ports for 1 DP rank" in line
    line = error_line(capsys, ["--model", "/m", "--splitwise-role", "prefill"])
    assert "needs --scheduler-name splitwise or --router" in line
    decode_async = "--splitwise-role decode --scheduler-name splitwise --async-scheduling"
    line = error_line(capsys, ["--model", "/m", *decode_async.split()])
    assert "--async-scheduling is for mixed instances" in line
    decode = parse_args(["--model", "/m", *decode_async.split()[:-1]])
    assert decode.async_scheduling  # the default, which a decode rank does not apply


def test_help_groups_flags_by_topic(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    groups = [
        "model:",
        "engine limits and KV cache:",
        "server and API:",
        "parallelism:",
        "disaggregation and KV transfer:",
        "cluster scheduler:",
    ]
    positions = [out.index(f"\n{group}\n") for group in groups]
    assert positions == sorted(positions)
    assert out.index("\n  --scheduler-ttl N") > out.index("\ncluster scheduler:")
    assert "usage: pd-serve" in out


def test_serve_args_is_frozen_and_api_port_needs_one_server():
    args = ServeArgs(model="/m", ports=[8001, 8002])
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.model = "/other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="2 API servers"):
        _ = args.api_port


def test_pick_free_port_returns_a_bindable_port():
    port = pick_free_port()
    assert 1 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['pd-serve', '--help']\n"
        "try:\n"
        "    runpy.run_module('pd.args', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'engine') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert "cluster scheduler:" in done.stdout
    assert elapsed < 3.0, f"pd-serve --help took {elapsed:.2f} s"


def test_scheduler_flags_make_a_scheduler_config() -> None:
    from pd.args import ServeArgs

    config = ServeArgs(
        model="m", scheduler_host="redis.local", scheduler_port=6380, scheduler_db=2,
        scheduler_password="pw", scheduler_topic="prod", scheduler_ttl=60,
        scheduler_expire_period=5000,
    ).scheduler_config()  # fmt: skip
    assert (config.host, config.port, config.db, config.password) == ("redis.local", 6380, 2, "pw")
    assert (config.topic, config.ttl_s, config.expire_period_ms) == ("prod", 60, 5000)
    assert config.heartbeat_interval_s == 1.25
