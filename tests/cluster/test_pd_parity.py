"""Disaggregated serving gives the same greedy tokens as the offline engine: 1P1D over
ipc (shared memory) and tcp, 2 prefill and 2 decode ranks (DP 2 each), 1P1D with TP
2 -> 2 (ipc), 2 -> 1 (ipc, tcp) and 1 -> 2 (tcp), and a mixed rank behind the splitwise
scheduler;
32 concurrent requests of mixed lengths through the official openai client, sent to
prefill and decode instances alike; streaming keeps token order; every KV block is
free again afterwards on every rank."""

from __future__ import annotations

import asyncio
import random
import time

import openai
import pytest
import torch

from pd import LLM, SamplingParams
from tests.cluster.cluster import Cluster, wait_blocks_free, wait_both_ranks_took_work

MAX_TOKENS = 12
WORDS = "prefill decode cache block layer token stream rank queue redis".split()  # noqa: SIM905


def prompts(count: int = 32, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    # about 4 tokens a word: 1 to ~180 tokens: single blocks, partial blocks, many blocks
    return [
        " ".join(rng.choices(WORDS, k=rng.choice([1, 2, 4, 5, 12, 30, 45]))) for _ in range(count)
    ]


def offline_reference(model_dir) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """prompt -> the offline engine's greedy text, for every prompt of ``prompts()``."""
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=256, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    texts = prompts()
    return {p: o.outputs[0].text for p, o in zip(texts, llm.generate(texts, params), strict=True)}


@pytest.fixture(scope="module")
def reference(model_dir) -> dict[str, str]:
    return offline_reference(model_dir)


async def complete_all(base_urls: list[str], texts: list[str], model: str = "tiny") -> list[str]:
    """Every prompt at once, spread over ``base_urls`` in turn."""
    clients = [
        openai.AsyncOpenAI(base_url=u, api_key="x", max_retries=0, timeout=60) for u in base_urls
    ]

    async def one(i: int, prompt: str) -> str:
        reply = await clients[i % len(clients)].completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert reply.choices[0].finish_reason == "length"
        return reply.choices[0].text

    try:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(texts)))
    finally:
        for client in clients:
            await client.close()


TP2 = ("--tensor-parallel-size", "2")
# layout -> the instances' roles, each with its own flags, and the flags they share
LAYOUTS = {
    "1P1D-ipc": ([("prefill",), ("decode",)], []),
    "1P1D-tcp": ([("prefill",), ("decode",)], ["--cache-transfer-protocol", "tcp"]),
    # (2 prefill and 2 decode ranks: test_dp2_prefill_and_dp2_decode_equal_offline...)
    "mixed": ([("mixed",)], []),
    # Each TP rank writes its heads into the decode TP rank(s) that need them.
    "1P1D-tp2-ipc": ([("prefill", *TP2), ("decode", *TP2)], []),
    # (TP 2 -> 2 over tcp: the sharded writes of 2 -> 1 and 1 -> 2 over tcp cover it)
    "1P1D-tp2to1-ipc": ([("prefill", *TP2), ("decode",)], []),
    "1P1D-tp1to2-tcp": ([("prefill",), ("decode", *TP2)], ["--cache-transfer-protocol", "tcp"]),
    # (TP 2 -> 1 over tcp: test_unequal_tp_over_tcp_with_the_cluster_secret below)
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_outputs_equal_offline(make_cluster, reference: dict[str, str], layout: str):
    instances, extra = LAYOUTS[layout]
    cluster: Cluster = make_cluster()
    servers = [cluster.start(role, *flags, *extra) for role, *flags in instances]
    roles = [role for role, *_ in instances]
    texts = prompts()
    got = asyncio.run(complete_all([s.base_url for s in servers], texts))
    assert got == [reference[p] for p in texts]

    client = openai.OpenAI(base_url=servers[-1].base_url, api_key="x", max_retries=0)
    prompt = texts[-1]
    stream = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    deltas = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(deltas) == reference[prompt]
    if not layout.startswith("mixed"):  # every request's KV moved, over the layout's protocol
        protocol = 'protocol="tcp"' if "tcp" in layout else 'protocol="ipc"'
        prefills = [s for s, role in zip(servers, roles, strict=True) if role == "prefill"]
        wait_until_counted(prefills, "pd:kv_transfer_bytes_count", protocol, len(texts) + 1)
    wait_blocks_free(servers)


@pytest.mark.gpu
def test_cuda_ipc_cluster_equals_offline_on_gpu(make_cluster, model_dir) -> None:
    """1P1D on two GPUs (one when there is only one): the decode rank pulls every layer's
    KV from the prefill rank's pool over CUDA ipc, and the greedy float32 tokens equal
    the offline engine's on the decode GPU."""
    decode_device = f"cuda:{torch.cuda.device_count() - 1}"
    blocks = 512  # a small pool: both ranks may share one GPU
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=256, device=decode_device,
              num_gpu_blocks_override=blocks)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    texts = prompts()
    expected = [o.outputs[0].text for o in llm.generate(texts, params)]
    del llm
    torch.cuda.empty_cache()
    cluster: Cluster = make_cluster()
    sized = ("--num-gpu-blocks-override", str(blocks))
    prefill = cluster.start("prefill", "--device", "cuda:0", *sized)
    decode = cluster.start("decode", "--device", decode_device, *sized)
    assert asyncio.run(complete_all([prefill.base_url, decode.base_url], texts)) == expected
    wait_until_counted([prefill], "pd:kv_transfer_bytes_count", 'protocol="ipc"', len(texts))
    wait_blocks_free([prefill, decode])


@pytest.mark.slow
def test_dp2_prefill_and_dp2_decode_equal_offline_over_all_four_ranks(make_cluster, reference):
    """The seed's layout at small scale: each DP rank registers as its own rank, takes
    work from Redis, and the load spreads over all of them."""
    cluster: Cluster = make_cluster()
    dp2 = ("--data-parallel-size", "2")
    prefill, decode = cluster.start("prefill", *dp2), cluster.start("decode", *dp2)
    texts = prompts()
    got = asyncio.run(complete_all([prefill.base_url, decode.base_url], texts))
    assert got == [reference[p] for p in texts]
    wait_both_ranks_took_work([prefill, decode], len(texts))
    wait_blocks_free([prefill, decode])


def wait_until_counted(servers, name: str, labels: str, expected: int) -> None:  # type: ignore[no-untyped-def]
    """The metric summed over ``servers`` reaches ``expected`` (stats come every 100 ms)."""
    deadline = time.monotonic() + 5
    while (total := sum(s.metric(name, labels) for s in servers)) < expected:
        assert time.monotonic() < deadline, f"{name}{{{labels}}} = {total}, not {expected}"
        time.sleep(0.1)
    assert total == expected


@pytest.mark.slow
def test_seeded_sampling_is_the_same_disaggregated_and_on_one_rank(make_cluster, model_dir):
    """Issue 17: the decode rank made a fresh generator, so a seeded non-greedy request
    sampled other tokens in 1P1D than on a mixed rank (the first token is prefill's)."""
    texts = prompts(6, seed=1)

    def params(i: int) -> SamplingParams:
        return SamplingParams(
            temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=MAX_TOKENS, ignore_eos=True
        )

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=256, device="cpu")
    outputs = llm.generate(texts, [params(i) for i in range(len(texts))])
    expected = [o.outputs[0].text for o in outputs]

    def served(base_url: str) -> list[str]:
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)
        return [
            client.completions.create(
                model="tiny", prompt=text, max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9,
                seed=100 + i, extra_body={"ignore_eos": True},
            ).choices[0].text
            for i, text in enumerate(texts)
        ]  # fmt: skip

    disaggregated = make_cluster()
    prefill = disaggregated.start("prefill", "--cache-transfer-protocol", "tcp")
    decode = disaggregated.start("decode", "--cache-transfer-protocol", "tcp")
    assert served(prefill.base_url) == expected
    mixed = make_cluster().start("mixed")
    assert served(mixed.base_url) == expected
    wait_blocks_free([prefill, decode, mixed])


@pytest.mark.slow
def test_unequal_tp_over_tcp_with_the_cluster_secret(model_dir, reference, tmp_path):
    """With a secret a tcp transfer takes bytes from one sender only: the prefill
    instance, whose two TP ranks both write heads of each request to the decode rank."""
    from pd.cluster_secret import redis_password
    from scheduler.redis_server import EmbeddedRedis

    secret = b"unequal-tp-cluster-secret-0123456"
    secret_file = tmp_path / "cluster.secret"
    secret_file.write_bytes(secret)
    common = ("--cache-transfer-protocol", "tcp", "--cluster-secret-file", str(secret_file))
    with EmbeddedRedis(password=redis_password(secret)) as redis_server:
        cluster = Cluster(redis_server, model_dir, tmp_path, "tsecret")
        try:
            prefill = cluster.start("prefill", *TP2, *common)
            decode = cluster.start("decode", *common)
            texts = prompts()[:8]
            got = asyncio.run(complete_all([prefill.base_url, decode.base_url], texts))
            assert got == [reference[p] for p in texts]
            wait_blocks_free([prefill, decode])
        finally:
            for server, code in cluster.stop():
                assert code == 0, server.log()[-4000:]
