"""OpenAI-style 400s for /v1 bodies that msgspec refused: a missing field, a wrong type and a value out of
range each get their own message and `code`, and `param` names the field ("messages[0].role").

Litestar hands over msgspec's text ("Object missing required field `model`", "Expected `int` >= 1") with
the path where it happened ("data" is the body itself); this turns it into words a client can act on.
"""

from __future__ import annotations

import re

import msgspec
from litestar.exceptions import ValidationException

from app.errors import ApiError

_MISSING = re.compile(r"missing required field `([^`]{1,100})`")
_WRONG_TYPE = re.compile(r"^Expected `([^`]{1,200})`, got `([^`]{1,50})`$")
_OUT_OF_RANGE = re.compile(r"^Expected `([^`]{1,200})` (.{1,100})$")
_AT_PATH = re.compile(r"^(.*) - at `\$\.?([^`]*)`$")
_BODY = "data"  # msgspec's (and Litestar's) name for the whole body
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


def _words(types: str) -> str:
    names = [t.strip() for t in types.split("|")]
    return " or ".join(_TYPE_WORDS.get(n, n) for n in names)


def _join(path: str, field: str) -> str:
    return field if path in ("", _BODY) else f"{path}.{field}"


def body_error(exc: ValidationException) -> ApiError:
    """The 400 for the first problem msgspec found in a /v1 body."""
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict) and item.get("key") and item.get("source") == "body":
            return _one(str(item["key"]).removeprefix("$."), str(item.get("message") or ""))
    if "JSON" in exc.detail or "decode" in exc.detail.lower():
        return ApiError(400, "Malformed JSON body", code="invalid_json")
    return ApiError(400, "The request body is not valid for this endpoint", code="invalid_request")


def strict_error(exc: msgspec.ValidationError) -> ApiError:
    """The 400 for msgspec's strict conversion of a /v1 body ("Expected `int`, got `str` - at `$.n`")."""
    text = str(exc)
    at = _AT_PATH.match(text)
    message, path = (at.group(1), at.group(2)) if at else (text, "")
    return _one(path or _BODY, message)


def _one(path: str, message: str) -> ApiError:
    missing = _MISSING.search(message)
    if missing:
        param = _join(path, missing.group(1))
        return ApiError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    wrong = _WRONG_TYPE.match(message)
    if path == _BODY:
        # A body that is JSON but not an object (an array, a string): nothing in it can be named.
        got = f", got {_words(wrong.group(2))}" if wrong else ""
        return ApiError(400, f"The request body must be a JSON object{got}.", code="invalid_json")
    if wrong:
        expected, got = _words(wrong.group(1)), _words(wrong.group(2))
        return ApiError(
            400,
            f"Invalid type for '{path}': expected {expected}, but got {got} instead.",
            param=path,
            code="invalid_type",
        )
    ranged = _OUT_OF_RANGE.match(message)
    if ranged:
        expected = f"{_words(ranged.group(1))} {ranged.group(2)}"
        return ApiError(
            400, f"Invalid value for '{path}': expected {expected}.", param=path, code="invalid_value"
        )
    # Anything else msgspec says (an enum value it does not know, ...) names the value, never our code.
    return ApiError(400, f"Invalid value for '{path}': {_clean(message)}.", param=path, code="invalid_value")


def _clean(message: str) -> str:
    return message.replace("`", "'").rstrip(".")[:200]
