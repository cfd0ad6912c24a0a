"""The offline LLM's DP and scheduler keywords are checked, with their names, before any
process starts; port lists are read as ``pd-serve`` reads them."""

from __future__ import annotations

import pytest

from pd import LLM
from pd.offline.options import DataParallelPlacement, queue_ports, scheduler_config


def test_placement_of_every_rank_or_one():
    every = DataParallelPlacement(size=3)
    assert every.ranks == [0, 1, 2] and not every.runs_in_process
    assert [every.local_index(r) for r in every.ranks] == [0, 1, 2]
    one = DataParallelPlacement(size=4, rank=3, rank_local=1, rpc_port=13345)
    assert one.ranks == [3] and one.runs_in_process and one.local_index(3) == 1
    assert one.master_port() == 13345
    kwargs = one.engine_kwargs({"tensor_parallel_size": 2}, 3, 13345)
    assert kwargs["device_offset"] == 2  # local rank 1 takes GPUs 2 and 3
    assert kwargs["data_parallel"] == {
        "rank": 3, "size": 4, "master_host": "127.0.0.1", "master_port": 13345
    }  # fmt: skip
    assert DataParallelPlacement().master_port() == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"size": 0}, "data_parallel_size must be an integer >= 1"),
        ({"size": 2, "rank": 2, "rpc_port": 1}, "data_parallel_rank must be at most 1"),
        ({"size": 2, "rank": 1}, "give data_parallel_rpc_port"),
        ({"size": 2, "rank_local": 0}, "data_parallel_rank_local needs data_parallel_rank"),
        ({"rpc_port": 70000}, "data_parallel_rpc_port must be at most 65535"),
    ],
)
def test_bad_placements_name_the_keyword(fields, message):
    with pytest.raises(ValueError, match=message):
        DataParallelPlacement(**fields)


def test_queue_ports_are_read_as_pd_serve_reads_them():
    two = DataParallelPlacement(size=2)
    assert queue_ports(None, two) == [0, 0]
    assert queue_ports("6077,6078", two) == [6077, 6078]
    assert queue_ports([6077, 6078], two) == [6077, 6078]
    assert queue_ports(6077, two) == [6077, 6078]  # one to count up from
    assert queue_ports("6077,6078,6079,6080", two) == [6077, 6078]  # the rest unused
    rank_one = DataParallelPlacement(size=2, rank=1, rpc_port=1)
    assert queue_ports("6077,6078", rank_one) == [6078]
    with pytest.raises(ValueError, match="engine_worker_queue_port has 3 ports"):
        queue_ports("1,2,3", DataParallelPlacement(size=4))
    with pytest.raises(ValueError, match=r"engine_worker_queue_port: .*empty entry"):
        queue_ports("6077,", two)
    with pytest.raises(ValueError, match=r"engine_worker_queue_port: .*70000"):
        queue_ports([6077, 70000], two)


def test_scheduler_keywords():
    config = scheduler_config("splitwise", "10.0.0.1", 6380, "test", "pw", 9000, 1000)
    assert (config.name, config.host, config.port, config.topic) == (
        "splitwise", "10.0.0.1", 6380, "test"
    )  # fmt: skip
    assert (config.password, config.ttl_s, config.expire_period_ms) == ("pw", 9000, 1000)
    with pytest.raises(ValueError, match="scheduler name"):
        scheduler_config("fancy", "h", 1, "t", None, 1, 1000)


def test_the_llm_refuses_bad_keywords_before_starting_anything(tiny_model):
    model = str(tiny_model("qwen2"))
    with pytest.raises(ValueError, match="engine_worker_queue_port has 3 ports"):
        LLM(model=model, data_parallel_size=4, engine_worker_queue_port="1,2,3")
    with pytest.raises(ValueError, match="give data_parallel_rpc_port"):
        LLM(model=model, data_parallel_size=2, data_parallel_rank=1)
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide"):
        LLM(model=model, data_parallel_size=2, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="scheduler topic"):
        LLM(model=model, scheduler_name="splitwise", scheduler_topic="no spaces")
