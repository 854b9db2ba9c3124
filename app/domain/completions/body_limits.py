"""Checks of a /v1 body that its schema cannot state, run in the routes' before_request hook.

msgspec decodes nested JSON recursively and raises RecursionError past the interpreter's depth limit
(about a thousand levels), which is not a decoding error Litestar knows: it would be a 500. Decoding the
body here first makes it a 400; Litestar keeps the decoded value, so the body is still parsed once.

Types are checked strictly here too: Litestar converts leniently (`"5"` to 5, `"true"` to True, as it
must for query strings), while OpenAI answers a string where a number belongs with a 400 `invalid_type`
naming the field. The decoded value is converted to the route's body type with `strict=True`; the
route's own (lenient) conversion then only ever sees values of the right types.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import SerializationException

from app.domain.completions.body_errors import strict_error
from app.errors import ApiError


async def refuse_deep_json(request: Request[Any, Any, Any]) -> None:
    try:
        body = await request.json()
    except RecursionError as exc:
        raise ApiError(400, "The request body is nested too deeply", code="invalid_json") from exc
    except SerializationException:
        return  # malformed JSON: the route's own decoding answers it, as for any other body
    field = request.route_handler.parsed_data_field
    if field is None:
        return
    try:
        msgspec.convert(body, field.annotation, strict=True)
    except msgspec.ValidationError as exc:
        raise strict_error(exc) from None
