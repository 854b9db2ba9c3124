"""Tool-call parsing on hand-written model outputs (Hermes / Qwen `<tool_call>`, Llama 3 JSON), the
choice of parser, and the plan a request's tools / tool_choice make. Pure: no engine, no server."""

from __future__ import annotations

import json

import msgspec
import pytest

from app.domain.completions import params, tools
from app.domain.completions.schemas import ChatCompletionRequest
from app.domain.completions.tool_parsers import ParsedCall, parse, parse_constrained, parser_for

NAMES = {"get_weather", "get_time"}


def test_hermes_calls_with_content_before_them() -> None:
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    )
    content, calls = parse("hermes", text, NAMES)
    assert content == "Let me check."
    assert calls == [
        ParsedCall("get_weather", '{"city": "Paris", "days": 2}'),
        ParsedCall("get_time", '{"zone": "CET"}'),
    ]


def test_hermes_unclosed_last_block_and_no_content() -> None:
    content, calls = parse("hermes", '<tool_call>{"name": "get_time", "arguments": {}}', NAMES)
    assert content is None and calls == [ParsedCall("get_time", "{}")]


@pytest.mark.parametrize(
    "text",
    [
        "Just an answer.",
        "<tool_call>not json</tool_call>",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not offered: never a call
        '<tool_call>{"name": "get_time", "arguments": "zone=UTC"}</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
    ],
)
def test_hermes_anything_else_is_plain_content(text: str) -> None:
    assert parse("hermes", text, NAMES) == (text, [])


def test_llama3_json_single_tagged_and_several() -> None:
    one = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert parse("llama3_json", one, NAMES) == (None, [ParsedCall("get_weather", '{"city": "Oslo"}')])
    tagged = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}'
    assert parse("llama3_json", tagged, NAMES)[1] == [ParsedCall("get_time", '{"zone": "UTC"}')]
    several = (
        '{"name": "get_time", "parameters": {"zone": "a;b"}}; '
        '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    )
    assert [c.name for c in parse("llama3_json", several, NAMES)[1]] == ["get_time", "get_weather"]
    assert json.loads(parse("llama3_json", several, NAMES)[1][0].arguments) == {"zone": "a;b"}


@pytest.mark.parametrize(
    "text",
    ["The weather is fine.", '{"name": "get_time", "parameters": {}} trailing', '{"city": "Oslo"}', "{"],
)
def test_llama3_anything_else_is_plain_content(text: str) -> None:
    assert parse("llama3_json", text, NAMES) == (text, [])


def test_parser_choice_from_setting_or_template() -> None:
    assert parser_for("{% for t in tools %}<tool_call>{% endfor %}") == "hermes"
    assert parser_for("{%- if message.role == 'ipython' %}<|python_tag|>") == "llama3_json"
    assert parser_for(None) == "hermes"
    assert parser_for("<tool_call>", "llama3_json") == "llama3_json"
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        parser_for(None, "mistral")


def test_constrained_outputs() -> None:
    text = '[{"name": "get_time", "arguments": {"zone": "UTC"}}, {"name": "get_weather", "arguments": {}}]'
    assert parse_constrained("required", None, text) == [
        ParsedCall("get_time", '{"zone": "UTC"}'),
        ParsedCall("get_weather", "{}"),
    ]
    assert parse_constrained("named", "get_time", '{"zone": "UTC"}') == [
        ParsedCall("get_time", '{"zone": "UTC"}')
    ]
    for cut in ('[{"name": "get_time", "argu', '{"zone": "U', "[1]"):
        assert parse_constrained("required", None, cut) == []
    assert parse_constrained("named", "get_time", "[]") == []


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]


def chat(**body: object) -> ChatCompletionRequest:
    return msgspec.convert(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}, ChatCompletionRequest
    )


def test_tool_choice_plans() -> None:
    assert params.chat_spec(chat()).tools is None
    assert params.chat_spec(chat(tools=TOOLS, tool_choice="none")).tools is None
    auto = params.chat_spec(chat(tools=TOOLS))
    assert auto.tools is not None and auto.tools.mode == "auto" and auto.params.structured is None
    named = params.chat_spec(
        chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    )
    assert named.params.structured is not None and json.loads(str(named.params.structured.value)) == WEATHER
    required = params.chat_spec(chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    assert required.params.structured is not None
    array = json.loads(str(required.params.structured.value))
    assert array["minItems"] == 1 and array["maxItems"] == 1
    names = [c["properties"]["name"]["const"] for c in array["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert array["items"]["anyOf"][1]["properties"]["arguments"] == {"type": "object"}


def test_assistant_tool_calls_reach_the_template_with_object_arguments() -> None:
    req = chat(
        messages=[
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
        ]
    )
    messages = tools.template_messages(params.chat_messages(req))
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"}
    assert messages[2] == {"role": "tool", "content": "12:00", "tool_call_id": "c1"}
    with pytest.raises(params.RequestError) as err:
        params.chat_messages(chat(messages=[{"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}]))
    assert err.value.param == "messages[0].tool_calls"
