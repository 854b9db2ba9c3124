"""Structured-output fields of a request -> the engine's StructuredSpec (constrained decoding).

OpenAI's `response_format` (`json_object`, `json_schema`) and vLLM's extensions: `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`, and their newer `structured_outputs` object
(`json`, `regex`, `choice`, `grammar`, `json_object`). At most one of them per request. Sizes and nesting
are SamplingParams' checks (engine/sampling_params.py); whether the spec compiles is the engine's
(engine/structured.py), asked before the request is admitted, so both answer with a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from app.domain.completions.params import invalid
from app.domain.completions.schemas import _SamplingFields
from engine.sampling_params import StructuredSpec

# structured_outputs options that tune a backend we do not have: accepted and ignored (documented).
IGNORED_OPTIONS = frozenset(
    {"disable_fallback", "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"}
)
_SO_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def structured_of(req: _SamplingFields) -> tuple[StructuredSpec | None, str]:
    """The request's spec (None: free text) and the name of the field it came from."""
    sources: list[tuple[str, Any]] = []
    response_format = getattr(req, "response_format", None)
    if response_format is not None and response_format.get("type", "text") != "text":
        sources.append(("response_format", response_format))
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
        value = getattr(req, name)
        if value is not None:
            sources.append((name, value))
    if not sources:
        return None, ""
    if len(sources) > 1:
        names = ", ".join(name for name, _ in sources)
        raise invalid(sources[1][0], f"set only one of {names}", code="conflicting_parameters")
    name, value = sources[0]
    return _spec(name, value), name


def _spec(name: str, value: Any) -> StructuredSpec:
    if name == "response_format":
        return _response_format(value)
    if name == "guided_json":
        return StructuredSpec("json_schema", _schema_text(name, value))
    if name == "guided_regex":
        return StructuredSpec("regex", value)
    if name == "guided_choice":
        return StructuredSpec("choice", tuple(value))
    if name == "guided_grammar":
        return StructuredSpec("grammar", value)
    return _structured_outputs(value)


def _response_format(value: dict[str, Any]) -> StructuredSpec:
    kind = value.get("type")
    if kind == "json_object":
        return StructuredSpec("json")
    if kind != "json_schema":
        raise invalid("response_format", "response_format type must be text, json_object or json_schema")
    block = value.get("json_schema")
    if not isinstance(block, dict):
        raise invalid("response_format", "response_format json_schema must be an object with a schema")
    name = block.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid("response_format", "response_format json_schema name must be a string")
    if "strict" in block and not isinstance(block["strict"], bool | None):
        raise invalid("response_format", "response_format json_schema strict must be a boolean")
    schema = block.get("schema")
    if schema is None:
        return StructuredSpec("json")  # a name without a schema: any JSON object
    return StructuredSpec("json_schema", _schema_text("response_format", schema))


def _structured_outputs(value: dict[str, Any]) -> StructuredSpec:
    if "structural_tag" in value and value["structural_tag"] is not None:
        raise invalid("structured_outputs", "structural_tag is not supported", code="unsupported_parameter")
    set_keys = [k for k in (*_SO_KINDS, "json_object") if value.get(k) not in (None, False)]
    unknown = sorted(set(value) - set(_SO_KINDS) - {"json_object", "structural_tag"} - IGNORED_OPTIONS)
    if unknown:
        raise invalid("structured_outputs", f"unknown structured_outputs field {unknown[0]!r}")
    if len(set_keys) != 1:
        raise invalid("structured_outputs", f"set exactly one of {', '.join(_SO_KINDS)}, json_object")
    key = set_keys[0]
    item = value[key]
    if key == "json_object":
        return StructuredSpec("json")
    if key == "json":
        return StructuredSpec("json_schema", _schema_text("structured_outputs", item))
    if key == "choice":
        if not isinstance(item, list):
            raise invalid("structured_outputs", "structured_outputs choice must be a list of strings")
        return StructuredSpec("choice", tuple(item))
    if not isinstance(item, str):
        raise invalid("structured_outputs", f"structured_outputs {key} must be a string")
    return StructuredSpec(_SO_KINDS[key], item)


def _schema_text(name: str, schema: Any) -> str:
    """A schema (an object, or JSON text of one) as compact JSON text; key order kept (it is the order
    the model writes the properties in)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise invalid(name, "the JSON schema is not valid JSON", code="invalid_schema") from None
    if not isinstance(schema, dict | bool):
        raise invalid(name, "the JSON schema must be an object", code="invalid_schema")
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
