"""Structured-output fields and logit_bias -> the engine's SamplingParams: every accepted form, and the
400s (naming the field) for the others. Pure: no engine, no server."""

from __future__ import annotations

import json

import msgspec
import pytest

from app.domain.completions import params
from app.domain.completions.schemas import ChatCompletionRequest, CompletionRequest
from engine.sampling_params import StructuredSpec

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}


def chat(**body: object) -> ChatCompletionRequest:
    return msgspec.convert(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}, ChatCompletionRequest
    )


def completion(**body: object) -> CompletionRequest:
    return msgspec.convert({"model": "m", "prompt": "hi", **body}, CompletionRequest)


@pytest.mark.parametrize(
    ("body", "want"),
    [
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredSpec("json")),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredSpec("json_schema", json.dumps(SCHEMA, separators=(",", ":"))),
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, StructuredSpec("json")),
        ({"guided_json": SCHEMA}, StructuredSpec("json_schema", json.dumps(SCHEMA, separators=(",", ":")))),
        (
            {"guided_json": json.dumps(SCHEMA)},
            StructuredSpec("json_schema", json.dumps(SCHEMA, separators=(",", ":"))),
        ),
        ({"guided_regex": "[a-z]+"}, StructuredSpec("regex", "[a-z]+")),
        ({"guided_choice": ["a", "b"]}, StructuredSpec("choice", ("a", "b"))),
        ({"guided_grammar": 'start: "x"'}, StructuredSpec("grammar", 'start: "x"')),
        (
            {"structured_outputs": {"json": SCHEMA}},
            StructuredSpec("json_schema", json.dumps(SCHEMA, separators=(",", ":"))),
        ),
        (
            {"structured_outputs": {"regex": "a", "disable_any_whitespace": True}},
            StructuredSpec("regex", "a"),
        ),
        ({"structured_outputs": {"choice": ["x"]}}, StructuredSpec("choice", ("x",))),
        ({"structured_outputs": {"grammar": 'start: "x"'}}, StructuredSpec("grammar", 'start: "x"')),
        ({"structured_outputs": {"json_object": True}}, StructuredSpec("json")),
    ],
)
def test_every_form_becomes_one_spec(body: dict[str, object], want: StructuredSpec | None) -> None:
    assert params.chat_spec(chat(**body)).params.structured == want
    assert params.completion_spec(completion(**body)).params.structured == want


def test_schema_key_order_is_kept() -> None:
    spec = params.chat_spec(chat(guided_json=SCHEMA)).params.structured
    assert spec is not None and list(json.loads(str(spec.value))["properties"]) == ["b", "a"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, "response_format"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": "[1, 2]"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["x" * 2000]}, "guided_choice"),
        ({"guided_regex": "a" * 70_000}, "guided_regex"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "guided_json"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
        ({"structured_outputs": {"surprise": 1, "regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": 5}}, "structured_outputs"),
    ],
)
def test_bad_forms_are_400s_naming_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(params.RequestError) as err:
        params.chat_spec(chat(**body))
    assert err.value.status == 400 and err.value.param == param


def test_logit_bias_keys_become_token_ids() -> None:
    spec = params.completion_spec(completion(logit_bias={"7": -100, "300": 2.5}))
    assert spec.params.logit_bias == {7: -100, 300: 2.5}
    for bad in ({"-1": 1}, {"1.5": 1}, {"": 1}, {"1": -100.5}, {str(i): 1 for i in range(301)}):
        with pytest.raises(params.RequestError) as err:
            params.completion_spec(completion(logit_bias=bad))
        assert err.value.param == "logit_bias"
    spec = params.completion_spec(completion(logit_bias={"600": 1}))
    with pytest.raises(params.RequestError) as err:
        spec.fit(4, vocab_size=512)
    assert err.value.param == "logit_bias"
