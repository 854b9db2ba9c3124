"""Streamed chat chunks when tools are offered, fed hand-written engine outputs: content streams up to a
(possible) tool call, calls arrive as deltas that join to the whole answer's calls, and every token is
carried by some frame exactly once (what a cut-off stream is billed). Pure: no engine, no server."""

from __future__ import annotations

import json
from typing import Any

from app.domain.completions import params, responses
from app.domain.completions.run import Caller, CompletionRun, Target
from app.domain.completions.tools import ToolPlan
from engine.request import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

TOOLS = [{"type": "function", "function": {"name": "get_time"}}]


def run_with(plan: ToolPlan) -> CompletionRun:
    spec = params.SamplingSpec(SamplingParams(), stream=True, tools=plan)
    return CompletionRun("chatcmpl-1", Caller(None, "t", None), Target(model="m"), [1], spec, "salt")


def stream(
    plan: ToolPlan, texts: list[str], reason: str = "stop", continuous: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """The chunks for outputs growing through `texts` (one token each), the last finished; and the tokens
    the frames carried."""
    run, state = run_with(plan), responses.StreamState(1)
    run.spec.continuous_usage = continuous
    run.streamed_tokens = 0  # as responses.stream counts them: after each frame is sent
    chunks, carried = [], 0
    for k, text in enumerate(texts):
        last = k == len(texts) - 1
        out = CompletionOutput(0, text, list(range(k + 1)), finish_reason=reason if last else None)
        for frame, tokens in responses._chunk(run, RequestOutput("r", [1], [out], last), state, True, str):
            chunks.append(json.loads(frame[len(b"data: ") :]))
            carried += tokens
            run.streamed_tokens += tokens
    return chunks, carried


def joined(chunks: list[dict[str, Any]]) -> tuple[str, list[dict[str, str]], str | None]:
    content, calls, reason = "", {}, None
    for chunk in chunks:
        choice = chunk["choices"][0]
        reason = choice["finish_reason"] or reason
        content += choice["delta"].get("content") or ""
        for delta in choice["delta"].get("tool_calls", []):
            call = calls.setdefault(delta["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.get("id", "")
            call["name"] += delta.get("function", {}).get("name", "")
            call["arguments"] += delta.get("function", {}).get("arguments", "")
    return content, [calls[k] for k in sorted(calls)], reason


def test_auto_streams_content_then_the_calls() -> None:
    plan = ToolPlan("auto", TOOLS, {"get_time": {}}, parser="hermes")
    call = '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    texts = ["Let me", "Let me check <tool", "Let me check " + call[:20], "Let me check " + call]
    chunks, carried = stream(plan, texts)
    content, calls, reason = joined(chunks)
    assert content == "Let me check " and reason == "tool_calls" and carried == len(texts)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_time", {"zone": "UTC"})]
    assert calls[0]["id"].startswith("call_")
    # "Let me" went out before the answer ended; nothing of the call did.
    first_content = next(c for c in chunks if c["choices"][0]["delta"].get("content"))
    assert first_content["choices"][0]["delta"]["content"] == "Let me"


def test_auto_without_calls_is_the_plain_text() -> None:
    plan = ToolPlan("auto", TOOLS, {"get_time": {}}, parser="hermes")
    texts = ["Hello", "Hello <tool", "Hello <toolbox> is here"]
    chunks, carried = stream(plan, texts, reason="length")
    assert joined(chunks) == ("Hello <toolbox> is here", [], "length") and carried == 3


def test_auto_llama3_holds_an_answer_that_starts_like_a_call() -> None:
    plan = ToolPlan("auto", TOOLS, {"get_time": {}}, parser="llama3_json")
    texts = ['{"name": "get_time",', '{"name": "get_time", "parameters": {}}']
    chunks, _ = stream(plan, texts)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert joined(chunks)[1:] == (
        [{"id": joined(chunks)[1][0]["id"], "name": "get_time", "arguments": "{}"}],
        "tool_calls",
    )
    prose, _ = stream(plan, ["It is", "It is noon."])
    assert joined(prose) == ("It is noon.", [], "stop")


def test_named_arguments_stream_as_written() -> None:
    plan = ToolPlan("named", TOOLS, {"get_time": {}}, named="get_time")
    texts = ['{"zo', '{"zone": "U', '{"zone": "UTC"}']
    chunks, carried = stream(plan, texts)
    content, calls, reason = joined(chunks)
    assert content == "" and reason == "tool_calls" and carried == 3
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", '{"zone": "UTC"}')]
    assert sum(bool(c["choices"][0]["delta"].get("tool_calls")) for c in chunks) == 4  # id+name, 3 pieces


def test_required_waits_for_the_whole_answer() -> None:
    plan = ToolPlan("required", TOOLS, {"get_time": {}})
    texts = ['[{"name": "get_time", ', '[{"name": "get_time", "arguments": {}}]']
    chunks, carried = stream(plan, texts)
    assert [c["choices"][0]["delta"] for c in chunks[:1]] == [{"role": "assistant"}] and carried == 2
    assert joined(chunks)[1][0]["name"] == "get_time" and joined(chunks)[2] == "tool_calls"
    cut, _ = stream(plan, texts[:1], reason="length")  # cut by max_tokens: its text, as content
    assert joined(cut) == ('[{"name": "get_time", ', [], "length")


def test_continuous_usage_counts_the_tokens_each_chunk_carried() -> None:
    plan = ToolPlan("auto", TOOLS, {"get_time": {}}, parser="hermes")
    texts = ["Hi", "Hi <tool", 'Hi <tool_call>{"name": "get_time", "arguments": {}}</tool_call>']
    chunks, carried = stream(plan, texts, continuous=True)
    used = [c["usage"]["completion_tokens"] for c in chunks]
    assert used == sorted(used) and used[-1] == carried == 3
