"""Strict JSON bodies: "60" is not an int, true is not a number.

Litestar validates bodies leniently (it converts "60" to 60, as it must for query strings). Handlers
of write routes keep their `data: JSONBody[Schema]` parameter for OpenAPI and call `strict_body` to get
the value, so a body of the wrong types is a 422 naming the field instead of a silent conversion.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from litestar import Request

from app.errors import ApiError

T = TypeVar("T")

_AT_PATH = re.compile(r"^(.*?) - at `\$\.?([^`]*)`$")
_FIELD = re.compile(r"(unknown|missing required) field `([^`]{1,100})`")


def validation_error(exc: msgspec.ValidationError) -> ApiError:
    text = str(exc)
    match = _AT_PATH.match(text)
    message, path = (match.group(1), match.group(2)) if match else (text, "")
    named = _FIELD.search(message)
    if named:
        # "Object contains unknown field `x`" is reported at the object; the client needs `x`.
        path = f"{path}.{named.group(2)}" if path else named.group(2)
        message = f"{named.group(1)} field"
    param = path or None
    if param is None:
        return ApiError(422, f"Invalid request body: {message}")
    return ApiError(422, f"Invalid value for '{param}': {message}", param=param)


async def strict_body(request: Request[Any, Any, Any], schema: type[T]) -> T:
    raw = await request.body()
    try:
        return msgspec.json.decode(raw, type=schema, strict=True)
    except msgspec.ValidationError as exc:
        raise validation_error(exc) from None
    except msgspec.DecodeError:
        raise ApiError(400, "Malformed JSON body", code="invalid_json") from None
