"""Tool calling in chat, as OpenAI defines it: `tools`, `tool_choice`, `parallel_tool_calls`.

- `none` (the default without tools): free text; the tools are not shown to the model.
- `auto` (the default with tools): the tools go through the model's chat template, the model writes
  freely, and the answer is parsed for its family's tool-call format (tool_parsers.py).
- `required`: the output is constrained to a JSON array of calls, each `{"name", "arguments"}` with the
  arguments valid for that function's parameters schema (parallel_tool_calls false: exactly one call).
- a named function: the output is constrained to that function's parameters: it is the arguments.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from app.domain.completions import tool_parsers
from app.domain.completions.params import invalid
from engine.sampling_params import StructuredSpec

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(slots=True)
class ToolPlan:
    mode: str  # auto | required | named
    tools: list[dict[str, Any]]  # OpenAI's form, for the chat template
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)  # function name -> schema
    named: str | None = None
    parallel: bool = True
    parser: str = ""  # auto: which family's format to parse (tool_parsers.PARSERS)

    def spec(self) -> StructuredSpec | None:
        """The grammar for required / named; None for auto (free text, parsed afterwards)."""
        if self.mode == "named":
            assert self.named is not None
            return StructuredSpec("json_schema", _compact(self.parameters[self.named]))
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": schema},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, schema in self.parameters.items()
        ]
        array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            array["maxItems"] = 1
        return StructuredSpec("json_schema", _compact(array))


def tool_plan(
    tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None, parallel: bool
) -> ToolPlan | None:
    """The request's tool handling; None when no tool can be called (no tools, or tool_choice none)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise invalid("tool_choice", "tool_choice needs tools")
        return None
    if len(tools) > MAX_TOOLS:
        raise invalid("tools", f"at most {MAX_TOOLS} tools are allowed")
    parameters: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        name, schema = _function(tool, f"tools[{i}]")
        if name in parameters:
            raise invalid(f"tools[{i}]", f"two tools are named {name!r}")
        parameters[name] = schema
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return None
    if choice in ("auto", "required"):
        return ToolPlan(str(choice), tools, parameters, parallel=parallel)
    if isinstance(choice, dict):
        function = choice.get("function")
        named = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(named, str):
            raise invalid(
                "tool_choice",
                'tool_choice must name a function: {"type": "function", "function": {"name": ...}}',
            )
        if named not in parameters:
            raise invalid("tool_choice", f"tool_choice names {named!r}, which is not in tools")
        return ToolPlan("named", tools, parameters, named=named, parallel=parallel)
    raise invalid("tool_choice", "tool_choice must be none, auto, required or a named function")


def _function(tool: Any, param: str) -> tuple[str, dict[str, Any]]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
        raise invalid(param, 'each tool must be {"type": "function", "function": {...}}')
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid(param, "a function name must be 1 to 64 letters, digits, underscores or dashes")
    schema = function.get("parameters", _ANY_OBJECT)
    if not isinstance(schema, dict):
        raise invalid(param, "a function's parameters must be a JSON schema object")
    return name, schema or _ANY_OBJECT


def _compact(schema: Any) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls as chat templates read them: arguments as an object, not JSON text."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_template_call(c) for c in calls]}
        out.append(message)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # not JSON: the template gets the text as sent
            function["arguments"] = json.loads(arguments)
    return {**call, "function": function}


def calls_of(plan: ToolPlan, text: str) -> tuple[str | None, list[tool_parsers.ParsedCall]]:
    """(content, calls) of a complete answer; no calls: the text is the content."""
    if plan.mode == "auto":
        return tool_parsers.parse(plan.parser, text, set(plan.parameters))
    calls = tool_parsers.parse_constrained(plan.mode, plan.named, text)
    return (None, calls) if calls else (text, [])
