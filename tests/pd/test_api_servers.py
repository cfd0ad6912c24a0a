"""One API server per DP rank (``pd/api_servers.py``): what each server's engine gets."""

from __future__ import annotations

from pd.api_servers import server_args
from pd.args import parse_args
from pd.serve import engine_kwargs


def test_each_servers_engine_takes_its_own_gpus():
    """DP 2 x TP 2 with --ports: DP rank r's engine starts at GPU 2r, as with one API
    server; every server runs one DP rank, so its own index cannot say where."""
    argv = ["--model", "m", "--device", "cuda", "--tensor-parallel-size", "2",
            "--data-parallel-size", "2", "--ports", "8001,8002"]  # fmt: skip
    args = parse_args(argv)
    one_server = parse_args(argv[:-2])
    for index in range(2):
        kwargs = engine_kwargs(server_args(args, index, dp_rpc_port=29500))
        assert kwargs["device_offset"] == engine_kwargs(one_server, index)["device_offset"]
        assert kwargs["device_offset"] == 2 * index


def test_a_second_hosts_servers_start_at_its_first_gpu():
    """DP ranks 2 and 3 of 4 on the second host take its GPUs 0 and 1."""
    args = parse_args(["--model", "m", "--device", "cuda", "--data-parallel-size", "4",
                       "--data-parallel-start-rank", "2", "--data-parallel-size-local", "2",
                       "--data-parallel-rpc-port", "29500", "--ports", "8001,8002"])  # fmt: skip
    servers = [server_args(args, index, dp_rpc_port=29500) for index in range(2)]
    assert [s.data_parallel_start_rank for s in servers] == [2, 3]
    assert [engine_kwargs(s)["device_offset"] for s in servers] == [0, 1]
    assert [engine_kwargs(s)["data_parallel"]["rank"] for s in servers] == [2, 3]
