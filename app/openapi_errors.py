"""The OpenAPI schema tells the truth about errors: the `{"error": {...}}` envelope, 422 for invalid
values, 401 on every route that needs a key, and no key on the routes that need none.

Litestar documents its own `{status_code, detail}` body for errors; our handlers answer with the
envelope everywhere (app/errors.py), so the generated schema is corrected once, when first built.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Litestar
from litestar.openapi.spec import OpenAPI, OpenAPIMediaType, OpenAPIResponse, Operation, Reference, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.routes import HTTPRoute

log = logging.getLogger(__name__)

ERROR_SCHEMA_NAME = "Error"
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

ERROR_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    required=["error"],
    properties={
        "error": Schema(
            type=OpenAPIType.OBJECT,
            required=["message", "type", "param", "code"],
            properties={
                "message": Schema(type=OpenAPIType.STRING),
                "type": Schema(type=OpenAPIType.STRING),
                "param": Schema(type=[OpenAPIType.STRING, OpenAPIType.NULL]),
                "code": Schema(type=[OpenAPIType.STRING, OpenAPIType.NULL]),
            },
        )
    },
    description='Every error: {"error": {"message", "type", "param", "code"}}',
)


def _error(description: str) -> OpenAPIResponse:
    ref = Reference(ref=f"#/components/schemas/{ERROR_SCHEMA_NAME}")
    return OpenAPIResponse(
        description=description, content={"application/json": OpenAPIMediaType(schema=ref)}
    )


def _is_litestar_default(response: Any) -> bool:
    if not isinstance(response, OpenAPIResponse) or not response.content:
        return False
    for media in response.content.values():
        schema = media.schema
        candidates = schema.one_of if isinstance(schema, Schema) and schema.one_of else [schema]
        for candidate in candidates:
            if (
                isinstance(candidate, Schema)
                and candidate.properties
                and "status_code" in candidate.properties
            ):
                return True
    return False


def _public_operations(app: Litestar) -> set[tuple[str, str]]:
    public = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if handler.opt.get("exclude_from_auth"):
                for method in handler.http_methods:
                    public.add((route.path_format or "/", method.lower()))
    return public


def correct_errors(app: Litestar, openapi: OpenAPI) -> None:
    if openapi.components.schemas is None:
        openapi.components.schemas = {}
    openapi.components.schemas[ERROR_SCHEMA_NAME] = ERROR_SCHEMA
    public = _public_operations(app)
    for path, item in (openapi.paths or {}).items():
        for method in _METHODS:
            operation: Operation | None = getattr(item, method, None)
            if operation is None:
                continue
            responses = operation.responses if operation.responses is not None else {}
            operation.responses = responses
            had_validation = _is_litestar_default(responses.get("400"))
            for status, response in list(responses.items()):
                if _is_litestar_default(response):
                    responses[status] = _error(
                        response.description if isinstance(response, OpenAPIResponse) else ""
                    )
            if had_validation:
                responses["400"] = _error("Malformed JSON body or bad request")
                responses.setdefault("422", _error("Invalid value: `error.param` names the field"))
            if (path, method) in public:
                operation.security = []
            else:
                responses.setdefault("401", _error("Missing, unknown, revoked or expired API key"))
                responses.setdefault("403", _error("The key may not call this route"))


def document_errors(app: Litestar) -> None:
    """on_startup hook: build the schema once and correct it in place (Litestar caches the object)."""
    try:
        correct_errors(app, app.openapi_schema)
    except Exception:
        # A schema that cannot be built breaks /schema, never the API itself.
        log.exception("could not build the OpenAPI schema")
