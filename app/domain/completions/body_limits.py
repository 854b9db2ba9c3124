"""Limits on the shape of a completion body that its schema cannot state.

msgspec decodes nested JSON recursively and raises RecursionError past the interpreter's depth limit
(about a thousand levels), which is not a decoding error Litestar knows: it would be a 500. Decoding the
body here first, in the route's before_request hook, makes it a 400; Litestar keeps the decoded value, so
the body is still decoded once.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.exceptions import SerializationException

from app.errors import ApiError


async def refuse_deep_json(request: Request[Any, Any, Any]) -> None:
    try:
        await request.json()
    except RecursionError as exc:
        raise ApiError(400, "The request body is nested too deeply", code="invalid_json") from exc
    except SerializationException:
        return  # malformed JSON: the route's own decoding answers it, as for any other body
