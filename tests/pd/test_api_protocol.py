"""OpenAI request validation, the mapping to SamplingParams, and response shapes that
the official ``openai`` client's own types accept."""

from __future__ import annotations

from typing import Any

import openai.types
import openai.types.chat
import pytest
from pydantic import ValidationError

from engine.outputs import Logprob, TokenLogprobs
from engine.sampling_params import SamplingParams
from pd.api.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    UsageInfo,
    chat_logprobs,
    completion_logprobs,
)

USER = [{"role": "user", "content": "hi"}]


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def error_locs(excinfo: pytest.ExceptionInfo[ValidationError]) -> list[tuple[Any, ...]]:
    return [tuple(e["loc"]) for e in excinfo.value.errors()]


@pytest.mark.parametrize("prompt", ["a b", ["a", "b"], [1, 2, 3], [[1, 2], [3]], [0]], ids=repr)
def test_completion_prompt_shapes(prompt):
    request = completion(prompt=prompt)
    prompts = request.prompts()
    assert all(isinstance(p, str) or all(isinstance(t, int) for t in p) for p in prompts)
    expected = 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else len(prompt)
    assert len(prompts) == expected


@pytest.mark.parametrize(
    "prompt", ["", [], [""], [[]], [1, "a"], [-1], [1.5], [True], 5, None, {"a": 1}], ids=repr
)
def test_completion_bad_prompts(prompt):
    with pytest.raises(ValidationError) as excinfo:
        completion(prompt=prompt)
    assert error_locs(excinfo) == [("prompt",)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("max_tokens", "16"),
        ("max_tokens", 1.5),
        ("n", 0),
        ("n", 129),
        ("n", 10**9),
        ("temperature", -0.1),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 2.0),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("logprobs", 6),
        ("logprobs", -1),
        ("seed", 2**64),
        ("seed", "1"),
        ("stream", 1),
        ("echo", "yes"),
        ("stop", 5),
        ("stop", [1]),
        ("stop_token_ids", [-1]),
        ("min_tokens", -1),
        ("ignore_eos", "true"),
        ("best_of", 2),
        ("suffix", "tail"),
        ("logit_bias", {"50256": -100}),
        ("stream_options", {"include_usage": True}),
        ("user", 7),
    ],
)
def test_completion_field_errors_name_the_field(field, value):
    with pytest.raises(ValidationError) as excinfo:
        completion(**{field: value})
    assert all(loc[0] == field for loc in error_locs(excinfo))


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError) as excinfo:
        completion(frobnicate=1)
    assert excinfo.value.errors()[0]["type"] == "extra_forbidden"
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "user", "content": "x", "extra": 1}])
    with pytest.raises(ValidationError):
        chat(stream=True, stream_options={"include_usage": True, "more": 1})


def test_accepted_values_and_nulls():
    request = completion(n=3, best_of=3, suffix=None, logit_bias={}, echo=True, user="u")
    assert request.n == 3 and request.echo
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage
    assert not completion(stream=True).include_usage
    nulls = completion(n=None, temperature=None, top_p=None, presence_penalty=None, max_tokens=None)
    assert nulls.to_sampling_params(50) == SamplingParams(max_tokens=50)


def test_completion_to_sampling_params():
    params = completion(
        max_tokens=7,
        temperature=0,
        top_p=0.5,
        n=2,
        stop="\n",
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logprobs=2,
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        ignore_eos=True,
        min_tokens=1,
        stop_token_ids=[9],
        include_stop_str_in_output=True,
        skip_special_tokens=False,
    ).to_sampling_params(default_max_tokens=100)
    assert params == SamplingParams(
        n=2,
        temperature=0.0,
        top_p=0.5,
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=3,
        stop=["\n"],
        stop_token_ids=[9],
        include_stop_str_in_output=True,
        ignore_eos=True,
        max_tokens=7,
        min_tokens=1,
        logprobs=2,
        skip_special_tokens=False,
    )
    assert completion().to_sampling_params(100).max_tokens == 16


def test_sampling_params_stays_the_final_judge():
    with pytest.raises(ValueError, match="min_tokens"):
        completion(max_tokens=2, min_tokens=5).to_sampling_params(100)
    with pytest.raises(ValueError, match="stop"):
        completion(stop=[""]).to_sampling_params(100)
    with pytest.raises(ValueError, match="max_tokens"):
        completion(max_tokens=None).to_sampling_params(0)


def test_chat_max_tokens_precedence_and_logprobs():
    assert chat().to_sampling_params(77).max_tokens == 77
    assert chat(max_tokens=5).to_sampling_params(77).max_tokens == 5
    assert chat(max_completion_tokens=6).to_sampling_params(77).max_tokens == 6
    both = chat(max_tokens=5, max_completion_tokens=6).to_sampling_params(77)
    assert both.max_tokens == 6
    assert chat().to_sampling_params(9).logprobs is None
    assert chat(logprobs=True).to_sampling_params(9).logprobs == 0
    assert chat(logprobs=True, top_logprobs=4).to_sampling_params(9).logprobs == 4


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"messages": []}, ("messages",)),
        ({"messages": "hi"}, ("messages",)),
        ({"messages": [{"role": "robot", "content": "x"}]}, ("messages", 0, "role")),
        ({"messages": [{"role": "user"}]}, ("messages", 0, "content")),
        ({"messages": [{"content": "x"}]}, ("messages", 0, "role")),
        ({"max_completion_tokens": 0}, ("max_completion_tokens",)),
        ({"max_tokens": -3}, ("max_tokens",)),
        ({"logprobs": 3}, ("logprobs",)),
        ({"top_logprobs": 2}, ("top_logprobs",)),
        ({"logprobs": True, "top_logprobs": 21}, ("top_logprobs",)),
        ({"response_format": {"type": "json_object"}}, ("response_format",)),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, ("response_format",)),
        ({"response_format": {"type": "xml"}}, ("response_format", "type")),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, ("tools",)),
        ({"tool_choice": "required"}, ("tool_choice",)),
        ({"n": 0}, ("n",)),
        ({"seed": 1.5}, ("seed",)),
    ],
)
def test_chat_field_errors(fields, loc):
    with pytest.raises(ValidationError) as excinfo:
        chat(**fields)
    assert error_locs(excinfo)[0][: len(loc)] == loc


def test_chat_rejects_image_parts_clearly():
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(ValidationError, match="'image_url' are not supported") as excinfo:
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "see"}, image]}])
    assert error_locs(excinfo) == [("messages", 0, "content")]


def test_chat_messages_for_the_template():
    request = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "ok", "name": "bot"},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ],
        response_format={"type": "text"},
        tools=[],
        tool_choice="none",
    )
    assert request.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "ok", "name": "bot"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]


def step(chosen: int, chosen_lp: float, chosen_rank: int, *top: tuple[int, float]) -> TokenLogprobs:
    """One TokenLogprobs as the sampler builds it: chosen first, then the top-k."""
    entries = {chosen: Logprob(chosen_lp, chosen_rank, f"t{chosen}")}
    for rank, (token_id, lp) in enumerate(top, start=1):
        entries.setdefault(token_id, Logprob(lp, rank, f"t{token_id}"))
    return entries


# Token 5 was sampled as the most likely; token 7 as the third most likely.
STEPS = [step(5, -0.1, 1, (5, -0.1), (6, -2.0)), step(7, -3.0, 3, (8, -0.5), (9, -1.0))]


def test_completion_logprobs_format():
    result = completion_logprobs([5, 7], STEPS, num_top=2, initial_text_offset=10)
    assert result.tokens == ["t5", "t7"]
    assert result.token_logprobs == [-0.1, -3.0]
    assert result.text_offset == [10, 12]
    assert result.top_logprobs == [{"t5": -0.1, "t6": -2.0}, {"t8": -0.5, "t9": -1.0, "t7": -3.0}]
    assert list(result.top_logprobs[1]) == ["t8", "t9", "t7"]  # ordered by rank
    only_chosen = completion_logprobs([5, 7], STEPS, num_top=0)
    assert only_chosen.top_logprobs == [{"t5": -0.1}, {"t7": -3.0}]


def test_chat_logprobs_format():
    result = chat_logprobs([5, 7], STEPS, num_top=2)
    first, second = result.content or []
    assert (first.token, first.logprob, first.bytes) == ("t5", -0.1, list(b"t5"))
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [("t5", -0.1), ("t6", -2.0)]
    assert [t.token for t in second.top_logprobs] == ["t8", "t9"]
    assert chat_logprobs([5], STEPS[:1], num_top=0).content[0].top_logprobs == []


def test_logprobs_never_leave_json_range():
    steps = [{3: Logprob(float("-inf"), 9, "é")}, {4: Logprob(float("nan"), 1, None)}]
    result = chat_logprobs([3, 4], steps, num_top=0)
    assert [t.logprob for t in result.content or []] == [-9999.0, -9999.0]
    assert result.content[0].bytes == list("é".encode())
    assert result.content[1].token == ""
    assert completion_logprobs([3], steps[:1], num_top=1).token_logprobs == [-9999.0]


def test_completion_responses_parse_with_openai_types():
    logprobs = completion_logprobs([5, 7], STEPS, num_top=2)
    choice = CompletionResponseChoice(
        index=0, text="t5t7", logprobs=logprobs, finish_reason="length"
    )
    response = CompletionResponse(model="m", choices=[choice], usage=UsageInfo.of(3, 2))
    parsed = openai.types.Completion.model_validate(response.model_dump())
    assert parsed.id.startswith("cmpl-") and parsed.object == "text_completion"
    assert parsed.usage is not None and parsed.usage.total_tokens == 5
    assert parsed.choices[0].logprobs is not None
    assert parsed.choices[0].logprobs.top_logprobs == logprobs.top_logprobs
    assert abs(parsed.created - response.created) <= 1
    # NOTE: OpenAI's type requires finish_reason, which mid-stream chunks send as null
    # (the client builds those without validation): check the last chunk.
    last = CompletionResponseChoice(index=0, text="t", finish_reason="stop")
    chunk = CompletionStreamResponse(id=response.id, model="m", choices=[last])
    assert openai.types.Completion.model_validate(chunk.model_dump()).choices[0].text == "t"
    usage_only = CompletionStreamResponse(model="m", choices=[], usage=UsageInfo.of(1, 1))
    assert openai.types.Completion.model_validate(usage_only.model_dump()).usage is not None


def test_chat_responses_parse_with_openai_types():
    choice = ChatCompletionResponseChoice(
        index=0,
        message=AssistantMessage(content="hello"),
        logprobs=chat_logprobs([5, 7], STEPS, num_top=2),
        finish_reason="stop",
    )
    response = ChatCompletionResponse(model="m", choices=[choice], usage=UsageInfo.of(4, 2))
    parsed = openai.types.chat.ChatCompletion.model_validate(response.model_dump())
    assert parsed.id.startswith("chatcmpl-") and parsed.object == "chat.completion"
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.content
    assert parsed.choices[0].logprobs.content[1].top_logprobs[0].token == "t8"
    chunks = [
        ChatCompletionChunk(
            model="m",
            choices=[
                ChatCompletionStreamChoice(
                    index=0, delta=DeltaMessage(role="assistant", content="")
                )
            ],
        ),
        ChatCompletionChunk(
            model="m",
            choices=[
                ChatCompletionStreamChoice(
                    index=0, delta=DeltaMessage(content="hi"), finish_reason="stop"
                )
            ],
        ),
        ChatCompletionChunk(model="m", choices=[], usage=UsageInfo.of(4, 1)),
    ]
    for chunk in chunks:
        parsed_chunk = openai.types.chat.ChatCompletionChunk.model_validate(chunk.model_dump())
        assert parsed_chunk.object == "chat.completion.chunk"
    assert parsed_chunk.usage is not None and parsed_chunk.usage.total_tokens == 5


def test_model_list_parses_with_openai_types():
    models = ModelList(data=[ModelCard(id="tiny", created=1, max_model_len=128)])
    dumped = models.model_dump()
    assert dumped["object"] == "list"
    parsed = openai.types.Model.model_validate(dumped["data"][0])
    assert (parsed.id, parsed.object, parsed.owned_by) == ("tiny", "model", "pd-serve")
