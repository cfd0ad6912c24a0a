from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from engine.output_processor import OutputProcessor
from engine.outputs import EngineCoreOutput, Logprob, OutputKind, RequestOutput
from engine.sampling_params import SamplingParams

PROMPT = "Say something:"


def _add(
    processor: OutputProcessor,
    tokenizer: PreTrainedTokenizerFast,
    request_id: str = "r",
    delta: bool = False,
    **params: object,
) -> list[str]:
    prompt_ids = tokenizer.encode(PROMPT)
    kind = OutputKind.DELTA if delta else OutputKind.CUMULATIVE
    return processor.add_request(request_id, PROMPT, prompt_ids, SamplingParams(**params), kind)


def _step(child_id: str, token_ids: list[int], **kwargs: object) -> EngineCoreOutput:
    return EngineCoreOutput(child_id, token_ids, **kwargs)


def _stream(
    processor: OutputProcessor,
    child_id: str,
    token_ids: list[int],
    finish: str | None = "length",
) -> list[RequestOutput]:
    """One token per step; the engine finishes the child with the last one."""
    results = []
    for i, token_id in enumerate(token_ids):
        reason = finish if i == len(token_ids) - 1 else None
        step = _step(child_id, [token_id], finish_reason=reason)
        results += processor.process([step]).request_outputs
    return results


def test_single_request_cumulative(tokenizer: PreTrainedTokenizerFast) -> None:
    processor = OutputProcessor(tokenizer)
    assert _add(processor, tokenizer) == ["r"]
    token_ids = tokenizer.encode("Hello 你好 😀!")
    results = _stream(processor, "r", token_ids)
    assert len(results) == len(token_ids)
    final = results[-1]
    assert final.finished and not any(r.finished for r in results[:-1])
    assert final.prompt == PROMPT and final.prompt_token_ids == tokenizer.encode(PROMPT)
    (completion,) = final.outputs
    assert completion.text == "Hello 你好 😀!"
    assert completion.token_ids == token_ids
    assert completion.finish_reason == "length" and completion.logprobs is None
    assert all("\ufffd" not in r.outputs[0].text for r in results)
    assert not processor.has_unfinished()


def test_delta_mode_concatenates_to_cumulative(tokenizer: PreTrainedTokenizerFast) -> None:
    token_ids = tokenizer.encode("Café 世界 🚀 done")
    processor = OutputProcessor(tokenizer)
    _add(processor, tokenizer, delta=True)
    deltas = _stream(processor, "r", token_ids)
    assert "".join(r.outputs[0].text for r in deltas) == "Café 世界 🚀 done"
    assert [t for r in deltas for t in r.outputs[0].token_ids] == token_ids
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"


def test_n_children_grouped_into_one_output(tokenizer: PreTrainedTokenizerFast) -> None:
    processor = OutputProcessor(tokenizer)
    child_ids = _add(processor, tokenizer, request_id="req", n=3)
    assert child_ids == ["req-0", "req-1", "req-2"]
    texts = ["one", " two", " three"]
    step = [_step(cid, tokenizer.encode(t)) for cid, t in zip(child_ids, texts, strict=True)]
    (output,) = processor.process(step).request_outputs
    assert output.request_id == "req" and not output.finished
    assert [(c.index, c.text) for c in output.outputs] == [(0, "one"), (1, " two"), (2, " three")]
    # Two children finish; the request is finished only with the third.
    step = [_step("req-2", [], finish_reason="length"), _step("req-0", [], finish_reason="stop")]
    (output,) = processor.process(step).request_outputs
    assert not output.finished and [c.finished for c in output.outputs] == [True, False, True]
    (output,) = processor.process([_step("req-1", [], finish_reason="length")]).request_outputs
    assert output.finished and not processor.has_unfinished()


def test_n_children_delta_reports_changed_completions(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    processor = OutputProcessor(tokenizer)
    _add(processor, tokenizer, request_id="q", n=2, delta=True)
    (output,) = processor.process([_step("q-1", tokenizer.encode("hi"))]).request_outputs
    assert [(c.index, c.text) for c in output.outputs] == [(1, "hi")]
    step = [_step("q-0", tokenizer.encode("a"), finish_reason="length")]
    step.append(_step("q-1", tokenizer.encode("!"), finish_reason="length"))
    (output,) = processor.process(step).request_outputs
    assert [(c.index, c.text) for c in output.outputs] == [(0, "a"), (1, "!")]
    assert output.finished


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_id(tokenizer: PreTrainedTokenizerFast, include: bool) -> None:
    stop_id = tokenizer.encode(".")[0]
    token_ids = [*tokenizer.encode("The end"), stop_id]
    processor = OutputProcessor(tokenizer)
    _add(processor, tokenizer, stop_token_ids=[stop_id], include_stop_str_in_output=include)
    step = _step("r", token_ids, finish_reason="stop", stop_reason=stop_id)
    (output,) = processor.process([step]).request_outputs
    completion = output.outputs[0]
    assert completion.text == ("The end." if include else "The end")
    assert completion.token_ids == token_ids
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_id)


def test_eos_token_is_not_in_text(tokenizer: PreTrainedTokenizerFast) -> None:
    eos = tokenizer.eos_token_id
    processor = OutputProcessor(tokenizer)
    _add(processor, tokenizer, skip_special_tokens=False)
    step = _step("r", [*tokenizer.encode("bye"), eos], finish_reason="stop", stop_reason=eos)
    (output,) = processor.process([step]).request_outputs
    assert output.outputs[0].text == "bye"
    assert output.outputs[0].token_ids[-1] == eos


@pytest.mark.parametrize("delta", [False, True])
def test_stop_string_cuts_text_and_aborts_child(
    tokenizer: PreTrainedTokenizerFast, delta: bool
) -> None:
    processor = OutputProcessor(tokenizer)
    child_ids = _add(processor, tokenizer, request_id="s", n=2, stop=["STOP"], delta=delta)
    token_ids = tokenizer.encode("go 你好 STOP here")
    num_kept = next(k for k in range(len(token_ids)) if "STOP" in tokenizer.decode(token_ids[:k]))
    results = _stream(processor, "s-0", token_ids, finish=None)
    assert len(results) == num_kept  # later steps of the stopped child are ignored
    assert results[-1].outputs[0].finish_reason == "stop"
    texts = [r.outputs[0].text for r in results]
    text = "".join(texts) if delta else texts[-1]
    assert text == "go 你好 "
    assert all("S" not in t for t in texts)  # nothing after the cut was ever emitted
    cumulative_ids = [t for r in results for t in r.outputs[0].token_ids]
    assert (cumulative_ids if delta else results[-1].outputs[0].token_ids) == token_ids[:num_kept]
    assert results[-1].outputs[0].stop_reason == "STOP"
    # Outputs for the stopped child are ignored; the sibling keeps going.
    late = processor.process([_step(child_ids[0], [5]), _step(child_ids[1], [5])])
    assert [c.index for c in late.request_outputs[0].outputs] == ([1] if delta else [0, 1])
    assert processor.abort("s") == ["s-1"]
    assert not processor.has_unfinished()


def test_stop_string_reports_abort_once(tokenizer: PreTrainedTokenizerFast) -> None:
    processor = OutputProcessor(tokenizer)
    _add(processor, tokenizer, stop=["END"])
    result = processor.process([_step("r", tokenizer.encode("x END y"))])
    assert result.to_abort == ["r"]
    assert result.request_outputs[0].finished
    assert result.request_outputs[0].outputs[0].text == "x "
    assert processor.process([_step("r", [7])]).request_outputs == []
    # A stop string in the engine's last step needs no abort.
    _add(processor, tokenizer, request_id="f", stop=["END"])
    result = processor.process([_step("f", tokenizer.encode("y END"), finish_reason="length")])
    assert result.to_abort == []
    assert result.request_outputs[0].outputs[0].stop_reason == "END"


def test_held_back_text_flushed_at_finish(tokenizer: PreTrainedTokenizerFast) -> None:
    processor = OutputProcessor(tokenizer)
    _add(processor, tokenizer, stop=["STOP"], delta=True)
    (first,) = processor.process([_step("r", tokenizer.encode("go ST"))]).request_outputs
    assert first.outputs[0].text == "go "
    (last,) = processor.process([_step("r", [], finish_reason="length")]).request_outputs
    assert last.outputs[0].text == "ST" and last.finished


def test_logprobs_are_decoded(tokenizer: PreTrainedTokenizerFast) -> None:
    processor = OutputProcessor(tokenizer)
    _add(processor, tokenizer, logprobs=1)
    hello, world = tokenizer.encode("Hello")[0], tokenizer.encode(" world")[0]
    logprobs = [{hello: Logprob(-0.1, 1), world: Logprob(-2.5, 2)}]
    step = _step("r", [hello], new_logprobs=logprobs, finish_reason="length")
    (output,) = processor.process([step]).request_outputs
    (entry,) = output.outputs[0].logprobs or []
    assert entry[hello].decoded_token == tokenizer.decode([hello])
    assert entry[world].decoded_token == tokenizer.decode([world])


def test_abort_and_unknown_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    processor = OutputProcessor(tokenizer)
    assert _add(processor, tokenizer, request_id="a", n=2) == ["a-0", "a-1"]
    assert processor.process([_step("nope", [1])]).request_outputs == []
    assert processor.abort("a") == ["a-0", "a-1"]
    assert processor.abort("a") == []
    assert processor.process([_step("a-0", [1])]).request_outputs == []
    assert not processor.has_unfinished()


def test_duplicate_request_id_rejected(tokenizer: PreTrainedTokenizerFast) -> None:
    processor = OutputProcessor(tokenizer)
    _add(processor, tokenizer, request_id="d")
    with pytest.raises(ValueError, match="already in use"):
        _add(processor, tokenizer, request_id="d")
    _add(processor, tokenizer, request_id="e-0")
    with pytest.raises(ValueError, match="already in use"):
        _add(processor, tokenizer, request_id="e", n=2)


def test_num_cached_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    processor = OutputProcessor(tokenizer)
    _add(processor, tokenizer)
    step = _step("r", [5], num_cached_tokens=3, finish_reason="length")
    assert processor.process([step]).request_outputs[0].num_cached_tokens == 3


def test_final_only_reports_once_at_the_end(tokenizer: PreTrainedTokenizerFast) -> None:
    processor = OutputProcessor(tokenizer)
    token_ids = tokenizer.encode("Café 世界")
    processor.add_request("f", PROMPT, [1, 2], SamplingParams(max_tokens=99), OutputKind.FINAL_ONLY)
    reported = []
    for i, token_id in enumerate(token_ids):
        last = i == len(token_ids) - 1
        output = EngineCoreOutput("f", [token_id], finish_reason="length" if last else None)
        reported.extend(processor.process([output]).request_outputs)
    assert len(reported) == 1 and reported[0].finished
    assert reported[0].outputs[0].text == "Café 世界"
    assert reported[0].outputs[0].token_ids == token_ids


@pytest.mark.parametrize("text", ["Hello 你好 😀!", "a\u0301 é 🎉 ok", "  spaces  and\nnewlines"])
def test_final_only_detokenizes_once_with_the_same_text(
    tokenizer: PreTrainedTokenizerFast, text: str
) -> None:
    """FINAL_ONLY completions without stop strings detokenize at the end: same result."""
    token_ids = tokenizer.encode(text)
    finals = []
    for kind in (OutputKind.CUMULATIVE, OutputKind.FINAL_ONLY):
        processor = OutputProcessor(tokenizer)
        prompt_ids = tokenizer.encode(PROMPT)
        processor.add_request("r", PROMPT, prompt_ids, SamplingParams(), kind)
        finals.append(_stream(processor, "r", token_ids)[-1].outputs[0])
    assert finals[1].text == finals[0].text
    assert finals[1].token_ids == finals[0].token_ids == token_ids
