"""OpenAI request validation and rendering: pure, no server, no engine."""

from __future__ import annotations

import msgspec
import pytest

from app.domain.completions import params, render
from app.domain.completions.schemas import ChatCompletionRequest, CompletionRequest
from engine.sampling_params import INT64_MAX, SamplingParams


def completion(**body: object) -> CompletionRequest:
    return msgspec.convert({"model": "m", "prompt": "hi", **body}, CompletionRequest)


def chat(**body: object) -> ChatCompletionRequest:
    return msgspec.convert(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}, ChatCompletionRequest
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("n", 0),
        ("n", 17),
        ("max_tokens", -1),
        ("min_p", 1.1),
        ("top_k", -2),
        ("logprobs", 21),
        ("presence_penalty", 3.0),
        ("prompt", [[-1]]),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(msgspec.ValidationError, match=field):
        completion(**{field: value})


def test_unknown_fields_are_ignored_like_openai_servers_do() -> None:
    assert completion(some_new_sdk_field=1).model == "m"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"cache_salt": "guess"}, "cache_salt"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"1": 5.0}}, "logit_bias"),
    ],
)
def test_cross_field_rules_name_the_parameter(body: dict[str, object], param: str) -> None:
    with pytest.raises(params.RequestError) as err:
        params.completion_spec(completion(**body))
    assert err.value.status == 400
    assert err.value.param == param


def test_chat_rules() -> None:
    with pytest.raises(params.RequestError) as err:
        params.chat_spec(chat(top_logprobs=3))
    assert err.value.param == "top_logprobs"
    with pytest.raises(params.RequestError) as err:
        params.chat_spec(chat(tools=[{"type": "function"}]))
    assert err.value.param == "tools"
    for body, param in (
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ):
        with pytest.raises(params.RequestError) as err:
            params.chat_spec(chat(**body))
        assert err.value.param == param
    assert params.chat_spec(chat(response_format={"type": "text"})).max_tokens is None
    spec = params.chat_spec(chat(max_completion_tokens=7, logprobs=True, top_logprobs=2))
    assert (spec.max_tokens, spec.logprobs, spec.params.logprobs) == (7, 2, 2)
    assert params.chat_spec(chat()).max_tokens is None


def test_spec_carries_every_sampling_field() -> None:
    spec = params.completion_spec(
        completion(
            max_tokens=9,
            temperature=0,
            top_p=0.5,
            n=2,
            stop="x",
            seed=3,
            top_k=5,
            min_p=0.1,
            min_tokens=2,
            ignore_eos=True,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert spec.max_tokens == 9 and spec.stream and spec.include_usage and spec.logprobs == 1
    assert spec.params == SamplingParams(
        n=2,
        max_tokens=9,
        temperature=0.0,
        top_p=0.5,
        min_p=0.1,
        seed=3,
        top_k=5,
        min_tokens=2,
        ignore_eos=True,
        stop=["x"],
        logprobs=1,
    )
    assert params.completion_spec(completion(top_k=-1)).params.top_k == 0
    # Unset fields keep the engine's defaults.
    assert params.completion_spec(completion()).params == SamplingParams(max_tokens=16)


def test_prompt_forms() -> None:
    text, tokens = params.TextPrompt, params.TokenPrompt
    assert params.normalize_prompts("hello") == [text("hello")]
    assert params.normalize_prompts(["hello"]) == [text("hello")]
    assert params.normalize_prompts([1, 2, 3]) == [tokens([1, 2, 3])]
    assert params.normalize_prompts([[4, 5]]) == [tokens([4, 5])]
    assert params.normalize_prompts(["a", "b"]) == [text("a"), text("b")]
    assert params.normalize_prompts([[1], "b"]) == [tokens([1]), text("b")]
    for bad, param in (
        ([], "prompt"),
        ([[]], "prompt[0]"),
        (["a", [], "c"], "prompt[1]"),
        (["a"] * 5, "prompt"),
    ):
        with pytest.raises(params.RequestError) as err:
            params.normalize_prompts(bad, max_prompts=4)
        assert err.value.param == param
    with pytest.raises(params.RequestError, match="together"):
        params.normalize_prompts(["x" * (params.MAX_PROMPT_CHARS // 2 + 1)] * 2)


def test_token_ids_outside_the_vocabulary_are_refused() -> None:
    params.check_tokens([0, 511], 512)
    with pytest.raises(params.RequestError) as err:
        params.check_tokens([3, 512], 512)
    assert err.value.param == "prompt"


def test_context_fitting() -> None:
    assert params.fit_context(10, None, 128, "prompt") == 118
    assert params.fit_context(10, 118, 128, "prompt") == 118
    with pytest.raises(params.RequestError) as err:
        params.fit_context(10, 119, 128, "prompt")
    assert (err.value.param, err.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(params.RequestError) as err:
        params.fit_context(128, None, 128, "messages")
    assert err.value.param == "messages"


def test_chat_messages_flatten_text_parts_and_refuse_images() -> None:
    req = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
    )
    assert params.chat_messages(req) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    req = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(params.RequestError) as err:
        params.chat_messages(req)
    assert err.value.param == "messages[0].content"
    with pytest.raises(msgspec.ValidationError, match="role"):
        chat(messages=[{"role": "root", "content": "x"}])


def test_sse_frames_and_logprobs() -> None:
    frame = render.sse_frame(render.usage(3, 2, 1))
    assert frame.startswith(b"data: {") and frame.endswith(b"\n\n")
    assert msgspec.json.decode(frame[6:]) == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1},
    }
    assert render.DONE_FRAME == b"data: [DONE]\n\n"
    decode = {1: "a", 2: "bc", 3: "d"}.__getitem__
    lp = render.completion_logprobs([1, 2], [{1: -0.1, 3: -2.0}, {2: -0.5, 1: -0.2}], 1, decode)
    assert lp.tokens == ["a", "bc"] and lp.token_logprobs == [-0.1, -0.5] and lp.text_offset == [0, 1]
    assert lp.top_logprobs == [{"a": -0.1}, {"a": -0.2}]
    chat_lp = render.chat_logprobs([2], [{2: -0.5, 1: -0.2, 3: -3.0}], 2, decode)
    assert chat_lp.content is not None
    assert [t.token for t in chat_lp.content[0].top_logprobs] == ["a", "bc"]
    assert chat_lp.content[0].bytes == [98, 99]
    assert render.finish_reason("length") == "length" and render.finish_reason(None) is None


HUGE = 2**63


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_k": HUGE}, "top_k"),  # used to kill the engine: "Overflow when unpacking long long"
        ({"top_k": 10**30}, "top_k"),
        ({"min_tokens": HUGE, "max_tokens": None}, "min_tokens"),
        ({"repetition_penalty": 1e308}, "repetition_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop_token_ids": [HUGE]}, "stop_token_ids"),
    ],
)
def test_sampling_ranges_are_the_engines_checks_and_name_the_field(
    body: dict[str, object], param: str
) -> None:
    with pytest.raises(params.RequestError) as err:
        params.completion_spec(completion(**body))
    assert (err.value.status, err.value.param) == (400, param)
    assert err.value.message.startswith(param)


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", -1), ("seed", INT64_MAX + 1), ("seed", 2**64), ("seed", True), ("stop_token_ids", [-1])],
)
def test_the_apis_own_limits_name_the_field(field: str, value: object) -> None:
    with pytest.raises(msgspec.ValidationError, match=field):
        completion(**{field: value})


def test_checks_that_need_the_model_run_when_the_spec_is_fitted() -> None:
    spec = params.completion_spec(completion(top_k=600, stop_token_ids=[3], max_tokens=None, min_tokens=4))
    with pytest.raises(params.RequestError) as err:
        spec.fit(3, vocab_size=1000)
    assert err.value.param == "min_tokens"
    spec.fit(8, vocab_size=1000)
    assert spec.params.max_tokens == 8 and spec.params.top_k == 600
    with pytest.raises(params.RequestError) as err:
        spec.fit(8, vocab_size=512)
    assert err.value.param == "top_k"
    chat_spec = params.chat_spec(chat(logprobs=True, top_logprobs=1))
    chat_spec.params.logprobs = (
        99  # as if the schema had let it through: the engine's check names chat's field
    )
    with pytest.raises(params.RequestError) as err:
        chat_spec.fit(8, vocab_size=512)
    assert err.value.param == "top_logprobs"
    with pytest.raises(params.RequestError) as err:
        params.chat_spec(chat(max_completion_tokens=2**63))
    assert err.value.param == "max_completion_tokens"
