"""Structured outputs, logit_bias and tool calls against a live server (demo model on CPU, real
PostgreSQL, Redis and S3) with the `openai` SDK. The demo model has random weights: every answer that
parses and validates does so because the grammar left it no other choice."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e import conftest as e2e
from tests.e2e.conftest import LiveServer, error_of
from tests.helpers.json_schemas import SCHEMAS

# The e2e suite's live server (one per module), reused here.
demo_model, module_database, module_s3, live_server = (
    e2e.demo_model,
    e2e.module_database,
    e2e.module_s3,
    e2e.live_server,
)

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def key(live_server: LiveServer) -> str:
    t = live_server.tenant()
    live_server.upload(t["id"], "attn", live_server.demo_model / "adapters" / "demo-attn")
    return live_server.key(t["id"])


@pytest.fixture(scope="module")
def client(live_server: LiveServer, key: str) -> Any:
    return live_server.openai(key)


@pytest.fixture(scope="module")
def http(live_server: LiveServer, key: str) -> Any:
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        yield c


def _chat(client: Any, stream: bool, **kw: Any) -> tuple[str, str | None]:
    """(content, finish_reason) of a chat answer, streamed or not."""
    kw = {"model": "demo-model", "messages": MESSAGES, "temperature": 0.0, "max_tokens": 128, **kw}
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        return choice.message.content, choice.finish_reason
    text, reason = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason


def test_fifty_schemas_validate_base_and_adapter_streaming_and_not(client: Any) -> None:
    def one(i: int) -> None:
        schema = SCHEMAS[i]
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        model = "attn" if (i // 2) % 2 else "demo-model"
        text, reason = _chat(client, stream=i % 2 == 1, model=model, response_format=fmt)
        assert reason == "stop", (i, text)
        jsonschema.validate(json.loads(text), schema)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(len(SCHEMAS))))


def test_every_structured_field_form(client: Any) -> None:
    schema = SCHEMAS[9]
    forms: list[tuple[dict[str, Any], Any]] = [
        ({"extra_body": {"guided_json": schema}}, schema),
        ({"extra_body": {"guided_json": json.dumps(schema)}}, schema),
        ({"extra_body": {"structured_outputs": {"json": schema}}}, schema),
        ({"response_format": {"type": "json_object"}}, {"type": "object"}),
        ({"extra_body": {"structured_outputs": {"json_object": True}}}, {"type": "object"}),
    ]
    for kw, want in forms:
        text, reason = _chat(client, stream=False, **kw)
        if reason == "stop":
            jsonschema.validate(json.loads(text), want)
        else:  # any JSON object may be long: cut by max_tokens, it is still a prefix of one
            assert want == {"type": "object"} and text.startswith("{"), (kw, text)
    choices = ["red", "green", "blue"]
    for kw in (
        {"extra_body": {"guided_choice": choices}},
        {"extra_body": {"structured_outputs": {"choice": choices}}},
    ):
        assert _chat(client, stream=False, **kw) in [(c, "stop") for c in choices]
    regex = r"[0-9]{2}:[0-9]{2}"
    for kw in (
        {"extra_body": {"guided_regex": regex}},
        {"extra_body": {"structured_outputs": {"regex": regex}}},
    ):
        text, reason = _chat(client, stream=True, **kw)
        assert reason == "stop" and len(text) == 5 and text[2] == ":" and text.replace(":", "").isdigit()
    grammar = 'start: "id-" DIGIT DIGIT\nDIGIT: /[0-9]/'
    text, reason = _chat(client, stream=False, extra_body={"guided_grammar": grammar})
    assert reason == "stop" and text.startswith("id-") and text[3:].isdigit() and len(text) == 5


def test_a_grammar_that_never_ends_stops_at_max_tokens(client: Any) -> None:
    out = client.completions.create(
        model="demo-model",
        prompt="x",
        max_tokens=6,
        temperature=0.0,
        extra_body={"guided_regex": "(ab){500}"},  # far longer than max_tokens allows
    )
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 6
    assert choice.text.startswith("ab") and set(choice.text) <= {"a", "b"}


def test_completions_take_response_format_and_guided_fields(client: Any) -> None:
    schema = SCHEMAS[5]
    for extra in (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}},
        {"guided_json": schema},
    ):
        out = client.completions.create(
            model="attn", prompt="JSON:", max_tokens=96, temperature=0.0, extra_body=extra
        )
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].text), schema)


def test_bad_huge_deep_and_conflicting_specs_are_400s(client: Any, http: Any) -> None:
    def refused(body: dict[str, Any]) -> dict[str, Any]:
        r = http.post("/v1/chat/completions", json={"model": "demo-model", "messages": MESSAGES, **body})
        assert r.status_code == 400, r.text
        return dict(r.json()["error"])

    bad_ref = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}
    err = refused({"response_format": bad_ref})
    assert (err["param"], err["code"]) == ("response_format", "invalid_schema") and "missing" in err[
        "message"
    ]
    err = refused({"guided_regex": "(unclosed"})
    assert (err["param"], err["code"]) == ("guided_regex", "invalid_schema")
    huge = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "description": "x" * 80} for i in range(900)},
    }
    err = refused({"guided_json": huge})
    assert err["param"] == "guided_json" and "65536" in err["message"]
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    err = refused({"guided_json": deep})
    assert err["param"] == "guided_json" and "deeper" in err["message"]
    err = refused({"guided_regex": "a+", "guided_choice": ["a"]})
    assert err["code"] == "conflicting_parameters"
    err = refused({"response_format": {"type": "yaml"}})
    assert err["param"] == "response_format"
    err = refused({"guided_json": {"type": "object"}, "tools": TOOLS, "tool_choice": "required"})
    assert err["code"] == "conflicting_parameters"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="demo-model",
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        )
    assert error_of(exc.value)["param"] == "response_format"


def test_logit_bias_pushes_and_bans_tokens(client: Any, http: Any) -> None:
    base = http.post(
        "/v1/completions",
        json={
            "model": "demo-model",
            "prompt": [0, 5, 6],
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 0,
        },
    ).json()["choices"][0]
    first = base["text"]
    pushed = client.completions.create(
        model="demo-model",
        prompt=[0, 5, 6],
        max_tokens=4,
        temperature=0.0,
        logit_bias={"300": 100},
        extra_body={"ignore_eos": True},
    )
    tokens = client.completions.create(
        model="demo-model",
        prompt=[0, 300, 300, 300, 300],
        max_tokens=1,
        temperature=0.0,
        logit_bias={"300": 100},
        extra_body={"ignore_eos": True},
    )
    assert pushed.choices[0].text == tokens.choices[0].text * 4 != first
    r = http.post("/v1/completions", json={"model": "demo-model", "prompt": "x", "logit_bias": {"300": 101}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    r = http.post("/v1/completions", json={"model": "demo-model", "prompt": "x", "logit_bias": {"99999": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


# ---- tools ----
def _calls(client: Any, stream: bool, **kw: Any) -> tuple[list[dict[str, str]], str | None, str | None]:
    """([{id, name, arguments}], content, finish_reason): a stream's deltas joined per call index."""
    kw = {
        "model": "demo-model",
        "messages": MESSAGES,
        "temperature": 0.0,
        "max_tokens": 96,
        "tools": TOOLS,
        **kw,
    }
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls or []
        ]
        return calls, choice.message.content, choice.finish_reason
    joined: dict[int, dict[str, str]] = {}
    content, reason = None, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            reason = choice.finish_reason or reason
            if choice.delta.content:
                content = (content or "") + choice.delta.content
            for delta in choice.delta.tool_calls or []:
                call = joined.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
    return [joined[i] for i in sorted(joined)], content, reason


@pytest.mark.parametrize("model", ["demo-model", "attn"])
def test_required_and_named_tool_calls_are_valid_and_streams_join_to_the_same_call(
    client: Any, model: str
) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        got = {stream: _calls(client, stream, model=model, tool_choice=choice) for stream in (False, True)}
        for calls, content, reason in got.values():
            assert reason == "tool_calls" and content is None and calls
            for call in calls:
                assert call["id"].startswith("call_")
                jsonschema.validate(json.loads(call["arguments"]), SCHEMA_OF[call["name"]])
        if isinstance(choice, dict):
            assert [c["name"] for c in got[False][0]] == ["get_weather"]
        strip = [[(c["name"], c["arguments"]) for c in got[s][0]] for s in (False, True)]
        assert strip[0] == strip[1]  # greedy: the stream's joined deltas are the same calls


def test_parallel_tool_calls_false_makes_one_call(client: Any) -> None:
    calls, _, reason = _calls(client, False, tool_choice="required", parallel_tool_calls=False)
    assert reason == "tool_calls" and len(calls) == 1


def test_a_conversation_with_a_tool_message_round_trips(client: Any) -> None:
    calls, _, _ = _calls(client, False, tool_choice={"type": "function", "function": {"name": "get_time"}})
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": calls[0]["id"],
                    "type": "function",
                    "function": {"name": "get_time", "arguments": calls[0]["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"time": "12:00"}'},
    ]
    plain = client.chat.completions.create(
        model="demo-model", messages=MESSAGES, max_tokens=4, temperature=0.0
    )
    answer = client.chat.completions.create(
        model="demo-model", messages=history, tools=TOOLS, max_tokens=4, temperature=0.0
    )
    # The tool turn reached the prompt through the chat template.
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 5
    again, _, reason = _calls(client, False, messages=history, tool_choice="required")
    assert reason == "tool_calls" and all(c["name"] in SCHEMA_OF for c in again)


def test_auto_and_none_answer_text_from_a_model_that_writes_no_calls(client: Any) -> None:
    for choice in ("auto", "none"):
        calls, content, reason = _calls(client, False, tool_choice=choice, max_tokens=8)
        assert calls == [] and isinstance(content, str) and reason in ("stop", "length")
        streamed, text, _ = _calls(client, True, tool_choice=choice, max_tokens=8)
        assert streamed == [] and text == content


def test_tool_refusals(http: Any) -> None:
    for body, param in (
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS * 2}, "tools[2]"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ):
        r = http.post("/v1/chat/completions", json={"model": "demo-model", "messages": MESSAGES, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
