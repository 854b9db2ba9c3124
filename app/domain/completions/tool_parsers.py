"""Model output -> OpenAI tool calls.

Two families' formats for `tool_choice: auto`, where the model writes freely:
- `hermes` (Hermes, Qwen 2.5 / 3, and ChatML models trained on it): `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`, one block per call, any text before them is the message's content;
- `llama3_json` (Llama 3.1 / 3.2 / 3.3): the whole answer is `{"name": ..., "parameters": {...}}`, optionally
  after `<|python_tag|>`, several calls separated by `;`.
Which one: LORAPLEX_TOOL_CALL_PARSER, else guessed from the tokenizer's chat template (`parser_for`).

`required` and named functions need no guessing: their output is constrained (tools.py), so it is JSON of
a known shape (`parse_constrained`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

PARSERS = ("hermes", "llama3_json")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_HERMES_OPEN = "<tool_call>"


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parser_for(chat_template: str | None, setting: str | None = None) -> str:
    """The setting when set, else the family the template's tool-call words point to (hermes otherwise)."""
    if setting:
        if setting not in PARSERS:
            raise ValueError(f"unknown tool-call parser {setting!r}; one of {', '.join(PARSERS)}")
        return setting
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def parse(parser: str, text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of an `auto` answer. Calls to functions not in `names`, or whose arguments are
    not a JSON object, make the answer plain content: a client must never get a call it did not offer."""
    calls = _hermes(text) if parser == "hermes" else _llama3(text)
    if calls is None or not calls[1] or any(c.name not in names for c in calls[1]):
        return text, []
    return calls


def content_end(parser: str, text: str) -> int:
    """How much of an `auto` answer so far is content for sure (streamable at once): everything before
    where a tool call starts or might start. The rest waits for the answer to end."""
    if parser == "hermes":
        start = text.find(_HERMES_OPEN)
        if start >= 0:
            return start
        for k in range(min(len(_HERMES_OPEN) - 1, len(text)), 0, -1):
            if text.endswith(_HERMES_OPEN[:k]):  # "<tool_c" may be the start of one
                return len(text) - k
        return len(text)
    body = text.lstrip()
    if not body or body.startswith("{") or body.startswith(_PYTHON_TAG) or _PYTHON_TAG.startswith(body):
        return 0  # llama3_json: the whole answer is the call, or it is content from its first character
    return len(text)


def _hermes(text: str) -> tuple[str | None, list[ParsedCall]] | None:
    start = text.find(_HERMES_OPEN)
    if start < 0:
        return None
    calls = []
    for block in _HERMES.findall(text[start:]):
        call = _call(block, "arguments")
        if call is None:
            return None
        calls.append(call)
    content = text[:start].strip()
    return (content or None), calls


def _llama3(text: str) -> tuple[str | None, list[ParsedCall]] | None:
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :].strip()
    if not body.startswith("{"):
        return None
    calls = []
    for piece in _split_objects(body):
        call = _call(piece, "parameters") or _call(piece, "arguments")
        if call is None:
            return None
        calls.append(call)
    return None, calls


def _split_objects(body: str) -> list[str]:
    """`{...}; {...}` -> the objects' texts (a `;` inside a string or object does not split)."""
    decoder = json.JSONDecoder()
    pieces, i = [], 0
    while i < len(body):
        try:
            _, end = decoder.raw_decode(body, i)
        except ValueError:
            return [body[i:]]  # let _call refuse it
        pieces.append(body[i:end])
        i = end
        while i < len(body) and body[i] in " \n\t;":
            i += 1
    return pieces


def _call(text: str, arguments_key: str) -> ParsedCall | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, {} if arguments_key not in value else None)
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], _json(arguments))


def parse_constrained(mode: str, named: str | None, text: str) -> list[ParsedCall]:
    """Calls of a complete `required` (a JSON array of {name, arguments}) or named-function answer (the
    arguments). [] when the text is not that JSON (it was cut by max_tokens or a stop string)."""
    try:
        value: Any = json.loads(text)
    except ValueError:
        return []
    if mode == "named":  # the text as written: what the stream's deltas concatenate to
        return [ParsedCall(str(named), text.strip())] if isinstance(value, dict) else []
    if not isinstance(value, list):
        return []
    calls = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        calls.append(ParsedCall(item["name"], _json(item.get("arguments", {}))))
    return calls


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
