"""Fifty JSON schemas for the structured-output tests: nested objects, arrays with min/max items, enums,
bounded numbers, required and optional properties, $defs. Every string and array is bounded, so even a
model with random weights reaches the end of the grammar in a few dozen tokens."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def _obj(props: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


def _s(max_length: int = 6, **extra: Any) -> Schema:
    return {"type": "string", "maxLength": max_length, **extra}


def _i(low: int = 0, high: int = 99) -> Schema:
    return {"type": "integer", "minimum": low, "maximum": high}


def _n(low: float = 0, high: float = 10) -> Schema:
    # multipleOf (a power of two, exact in binary) bounds the fraction: a random model would otherwise write digits until max_tokens.
    return {"type": "number", "minimum": low, "maximum": high, "multipleOf": 0.25}


def _arr(items: Schema, low: int = 0, high: int = 3) -> Schema:
    return {"type": "array", "items": items, "minItems": low, "maxItems": high}


def _enum(*values: Any) -> Schema:
    return {"enum": list(values)}


def _schemas() -> list[Schema]:
    person = _obj({"name": _s(), "age": _i(0, 120)})
    out: list[Schema] = [
        _obj({"name": _s()}),
        _obj({"count": _i()}),
        _obj({"ok": {"type": "boolean"}}),
        _obj({"color": _enum("red", "green", "blue")}),
        _obj({"score": _n(0, 1)}),
        _obj({"name": _s(), "age": _i(0, 120), "active": {"type": "boolean"}}),
        _obj({"tags": _arr(_s(4), 1, 3)}),
        _obj({"ids": _arr(_i(0, 9), 2, 2)}),
        _obj({"point": _obj({"x": _i(-9, 9), "y": _i(-9, 9)})}),
        _obj({"user": person, "role": _enum("admin", "member")}),
        _obj({"a": _s(), "b": _s()}, required=["a"]),
        _obj({"a": _i(), "b": _i(), "c": _i()}, required=[]),
        _obj({"level": _enum(1, 2, 3)}),
        _obj({"value": {"type": ["integer", "null"], "minimum": 0, "maximum": 5}}),
        _obj({"status": {"const": "done"}}),
        _obj({"people": _arr(person, 1, 2)}),
        _obj({"matrix": _arr(_arr(_i(0, 9), 1, 2), 1, 2)}),
        _obj({"kind": _enum("a", "b"), "size": _i(1, 3), "label": _s(3)}),
        _obj({"temperature": _n(-50, 50), "unit": _enum("C", "F")}),
        _obj({"nested": _obj({"deeper": _obj({"deepest": _i(0, 1)})})}),
        {
            "$defs": {"item": _obj({"id": _i(), "qty": _i(1, 5)})},
            **_obj({"items": _arr({"$ref": "#/$defs/item"}, 1, 2)}),
        },
        {"$defs": {"p": person}, **_obj({"owner": {"$ref": "#/$defs/p"}, "pet": _s()})},
        {
            "$defs": {"c": _enum("x", "y", "z")},
            **_obj({"first": {"$ref": "#/$defs/c"}, "second": {"$ref": "#/$defs/c"}}),
        },
        _obj({"title": _s(10), "pages": _i(1, 999), "isbn": _s(8, pattern="^[0-9]+$")}),
        _obj({"code": _s(3, pattern="^[A-Z]{3}$")}),
        _obj({"date": _s(10, pattern="^[0-9]{4}-[0-9]{2}-[0-9]{2}$")}),
        _obj({"flags": _arr({"type": "boolean"}, 0, 3)}),
        _obj({"choice": {"anyOf": [_i(0, 9), _s(3)]}}),
        _obj({"shape": {"oneOf": [_obj({"r": _i(1, 9)}), _obj({"w": _i(1, 9), "h": _i(1, 9)})]}}),
        _obj({"latitude": _n(-90, 90), "longitude": _n(-180, 180)}),
        _obj({"min": _i(0, 10), "max": _i(10, 20)}, required=["min"]),
        _obj({"answer": _enum("yes", "no", "maybe"), "confidence": _n(0, 1)}),
        _obj({"words": _arr(_s(5), 1, 3), "count": _i(1, 3)}),
        _obj({"address": _obj({"street": _s(), "zip": _s(5, pattern="^[0-9]{5}$")}, required=["zip"])}),
        _obj({"event": _obj({"name": _s(), "when": _obj({"h": _i(0, 23), "m": _i(0, 59)})})}),
        _obj({"pair": {"type": "array", "prefixItems": [_i(0, 9), _s(3)], "items": False, "minItems": 2}}),
        _obj({"empty": _obj({})}),
        _obj({"opt": _obj({"x": _i()}, required=[])}, required=[]),
        _obj({"priority": _enum("low", "medium", "high"), "tags": _arr(_enum("a", "b", "c"), 0, 2)}),
        _obj({"price": _n(0, 1000), "currency": _enum("EUR", "USD")}),
        _obj({"small": _i(-3, 3), "big": _i(1000, 2000)}),
        _obj({"rows": _arr(_obj({"k": _s(3), "v": _i(0, 9)}), 1, 3)}),
        _obj({"maybe": {"type": ["string", "null"], "maxLength": 4}}),
        _obj(
            {"ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "multipleOf": 0.125}}
        ),
        _obj({"grid": _arr(_arr(_enum(0, 1), 2, 2), 2, 2)}),
        {
            "$defs": {"leaf": _obj({"v": _i(0, 9)})},
            **_obj({"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}}),
        },
        _obj({"id": _s(8, pattern="^[a-f0-9]{8}$"), "version": _i(1, 9)}),
        _obj({"list": _arr(_i(0, 99), 3, 3), "sum": _i(0, 300)}),
        _obj({"profile": _obj({"bio": _s(12), "links": _arr(_s(6), 0, 2)}, required=["bio"])}),
        _obj({"mode": _enum("on", "off", None)}),
    ]
    return out


SCHEMAS: list[Schema] = _schemas()


def twenty_field_schema() -> Schema:
    """The benchmark's schema: twenty required fields of mixed, bounded types."""
    kinds = [_i(0, 999), _s(8), {"type": "boolean"}, _enum("a", "b", "c"), _n(0, 100)]
    return _obj({f"field_{i}": kinds[i % len(kinds)] for i in range(20)})
