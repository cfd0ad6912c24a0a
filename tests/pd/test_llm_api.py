"""Offline API behaviour: outputs, sampling controls, chat, and bad input."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from pd import LLM, SamplingParams

PROMPTS = ["Hello world", "The cache moves layer by layer", "数据并行 is", "x"]


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(model=str(tiny_model("qwen2")), dtype="float32", max_model_len=128, seed=0)


@pytest.fixture(autouse=True)
def no_leak(request):
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        assert not engine.has_unfinished()
        engine.block_manager.check_invariants(live=[])
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, **kwargs)


def test_outputs_come_back_in_order_with_all_fields(llm):
    params = [greedy(max_tokens=n) for n in (3, 5, 7, 9)]
    outputs = llm.generate(PROMPTS, params)
    assert [o.prompt for o in outputs] == PROMPTS
    for out, n in zip(outputs, (3, 5, 7, 9), strict=True):
        completion = out.outputs[0]
        assert out.finished and len(completion.token_ids) == n
        assert completion.finish_reason == "length"
        decoded = llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.text == decoded
        assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt)


def test_token_id_prompts(llm):
    ids = llm.tokenizer.encode(PROMPTS[1])
    by_text = llm.generate(PROMPTS[1], greedy(max_tokens=6))[0]
    by_ids = llm.generate(ids, greedy(max_tokens=6))[0]
    assert by_ids.prompt is None and by_ids.prompt_token_ids == ids
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids
    two = llm.generate([ids, ids[:3]], greedy(max_tokens=2))
    assert [o.prompt_token_ids for o in two] == [ids, ids[:3]]


def test_stop_string_cuts_text_exactly(llm):
    full = llm.generate(PROMPTS[0], greedy(max_tokens=24))[0].outputs[0].text
    stop = full[5:8]
    expected = full[: full.index(stop)]
    out = llm.generate(PROMPTS[0], greedy(max_tokens=24, stop=[stop]))[0].outputs[0]
    assert out.text == expected
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(
        PROMPTS[0], greedy(max_tokens=24, stop=[stop], include_stop_str_in_output=True)
    )[0].outputs[0]
    assert kept.text == expected + stop


def test_stop_token_ids_and_min_tokens(llm):
    tokens = llm.generate(PROMPTS[0], greedy(max_tokens=12))[0].outputs[0].token_ids
    stop_id = tokens[4]
    first = tokens.index(stop_id)
    out = llm.generate(PROMPTS[0], greedy(max_tokens=12, stop_token_ids=[stop_id]))[0]
    completion = out.outputs[0]
    assert completion.token_ids == tokens[: first + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_id
    held = llm.generate(PROMPTS[0], greedy(max_tokens=12, stop_token_ids=[stop_id], min_tokens=8))[
        0
    ].outputs[0]
    assert len(held.token_ids) >= 8
    assert stop_id not in held.token_ids[:7]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], params)[0].outputs[0].token_ids
    again = llm.generate(PROMPTS[1], params)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = llm.generate(PROMPTS, [unseeded, params, unseeded, unseeded])
    assert alone == again == batch[1].outputs[0].token_ids


def test_seeded_sampling_survives_preemption(tiny_model):
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=40, ignore_eos=True)
    path = str(tiny_model("qwen2"))
    roomy = LLM(model=path, dtype="float32", max_model_len=64, block_size=4)
    tight = LLM(
        model=path,
        dtype="float32",
        max_model_len=64,
        block_size=4,
        num_gpu_blocks_override=16,
        enable_prefix_caching=False,
    )
    expected = [o.outputs[0].token_ids for o in roomy.generate(PROMPTS, params)]
    got = [o.outputs[0].token_ids for o in tight.generate(PROMPTS, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected


def test_n_completions(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    out = llm.generate(PROMPTS[0], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    sequences = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(sequences)) > 1
    assert [tuple(c.token_ids) for c in llm.generate(PROMPTS[0], params)[0].outputs] == sequences


def test_logprobs_match_hf(llm, tiny_model):
    prompt_ids = llm.tokenizer.encode(PROMPTS[1])
    out = llm.generate(prompt_ids, greedy(max_tokens=3, logprobs=4))[0].outputs[0]
    assert len(out.logprobs) == 3
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model("qwen2")), dtype=torch.float32)
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt_ids + out.token_ids])).logits[0]
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        reference = logits[len(prompt_ids) - 1 + step].log_softmax(-1)
        top = reference.topk(4)
        assert set(entry) == {token, *top.indices.tolist()}
        assert entry[token].rank == 1  # greedy picks the most likely token
        for token_id, logprob in entry.items():
            assert logprob.logprob == pytest.approx(reference[token_id].item(), abs=1e-4)
            assert logprob.decoded_token == llm.tokenizer.decode([token_id])


def test_chat_uses_the_template(llm):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi"},
    ]
    out = llm.chat(messages, greedy(max_tokens=4))[0]
    expected = llm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert out.prompt == expected
    assert out.prompt_token_ids == llm.tokenizer.encode(expected, add_special_tokens=False)
    both = llm.chat([messages, messages[1:]], greedy(max_tokens=2))
    assert len(both) == 2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", -3, "max_tokens"),
        ("temperature", -0.5, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -2, "top_k"),
        ("min_p", 2.0, "min_p"),
        ("n", 0, "n"),
        ("logprobs", 50, "logprobs"),
        ("presence_penalty", 3.0, "presence_penalty"),
        ("stop", [""], "stop"),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_empty_prompt_is_rejected(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", greedy(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, greedy(max_tokens=2))


def test_too_long_prompt_is_rejected_with_lengths(llm):
    too_long = list(range(1, 200))
    with pytest.raises(ValueError, match=r"199 tokens.*max_model_len is 128"):
        llm.generate([PROMPTS[0], too_long], greedy(max_tokens=2))
    assert llm.generate(PROMPTS[0], greedy(max_tokens=2))[0].finished  # still serving


def test_out_of_vocab_token_ids_are_rejected(llm):
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**6]], greedy(max_tokens=2))


def test_mismatched_params_list_is_rejected(llm):
    with pytest.raises(ValueError, match="2 entries for 4 prompts"):
        llm.generate(PROMPTS, [greedy(), greedy()])


def test_generation_stops_at_max_model_len(llm):
    prompt = list(range(1, 121))
    out = llm.generate([prompt], greedy(max_tokens=100))[0].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_dummy_load_format_needs_no_checkpoint(tiny_model, tmp_path):
    source = tiny_model("qwen3")
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, tmp_path / path.name)
    dummy = LLM(model=str(tmp_path), load_format="dummy", max_model_len=64)
    out = dummy.generate(PROMPTS[0], greedy(max_tokens=5))[0]
    assert len(out.outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="safetensors"):
        LLM(model=str(tmp_path), max_model_len=64)


def test_unsupported_options_are_refused(tiny_model):
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide"):
        LLM(model=str(tiny_model("qwen2")), tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        LLM(model=str(tiny_model("qwen2")), tensor_parallel_size=0)
    with pytest.raises(ValueError, match="device"):
        LLM(model=str(tiny_model("qwen2")), device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=str(tiny_model("qwen2")), dtype="int3")


def test_llm_keeps_the_callers_torch_threads(tiny_model):
    before = torch.get_num_threads()
    chosen = before + 1  # anything but torch's default
    torch.set_num_threads(chosen)
    try:
        llm = LLM(model=str(tiny_model("qwen2")), dtype="float32", max_model_len=64)
        llm.generate("Hello", greedy(max_tokens=2))
        assert torch.get_num_threads() == chosen
    finally:
        torch.set_num_threads(before)


def test_repetition_penalty_matches_hf_under_preemption(tiny_model) -> None:
    """The worker's device-side token history (filled on join, refilled after each
    preemption, bumped per sampled token) penalizes as HF generate does."""
    from tests.pd.hf_reference import hf_greedy

    model_dir = tiny_model("llama")
    llm = LLM(
        model=str(model_dir), dtype="float32", max_model_len=128, num_gpu_blocks_override=8,
        block_size=16, max_num_batched_tokens=32,
    )  # fmt: skip
    prompts = [list(range(3 + i, 40 + 2 * i)) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.8)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert llm.engine.scheduler.num_preemptions > 0
    reference = hf_greedy(model_dir, prompts, 24, repetition_penalty=1.8)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True))  # fmt: skip
    assert [o.outputs[0].token_ids for o in plain] != reference  # the penalty did something
