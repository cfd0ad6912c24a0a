"""1P1D through ``pd-router --splitwise`` on GPUs, no Redis: the decode rank pulls the
KV over CUDA ipc as in the Redis path, and the greedy float32 tokens equal the offline
engine's on the decode GPU."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pd import LLM, SamplingParams
from tests.cluster.test_pd_parity import MAX_TOKENS, complete_all, prompts, wait_until_counted
from tests.pd.router.router_process import start_router, wait_instances
from tests.pd.server_process import start_server

pytestmark = pytest.mark.gpu


def test_router_paired_cuda_ipc_equals_offline(tiny_model, tmp_path):
    model_dir = tiny_model("llama")
    decode_device = f"cuda:{torch.cuda.device_count() - 1}"
    blocks = ("--num-gpu-blocks-override", "512")  # a small pool: both may share one GPU
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=256, device=decode_device,
              num_gpu_blocks_override=512)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    texts = prompts()
    expected = [o.outputs[0].text for o in llm.generate(texts, params)]
    del llm
    torch.cuda.empty_cache()
    router = start_router(tmp_path / "router.log", "--splitwise")
    servers = []
    try:
        flags = ["--router", f"127.0.0.1:{router.port}", *blocks, "--cache-transfer-protocol",
                 "ipc"]  # fmt: skip
        for role, device in (("prefill", "cuda:0"), ("decode", decode_device)):
            servers.append(start_server(model_dir, tmp_path / f"{role}.log", "--splitwise-role",
                                        role, "--device", device, *flags))  # fmt: skip
        wait_instances(router, {s.root_url for s in servers})
        model = str(model_dir)
        assert asyncio.run(complete_all([router.base_url], texts, model)) == expected
        wait_until_counted(servers[:1], "pd:kv_transfer_bytes_count", 'protocol="ipc"',
                           len(texts))  # fmt: skip
    finally:
        for server in servers:
            server.stop()
        router.stop()
