"""One error shape everywhere: `{"error": {"message", "type", "param", "code"}}` (OpenAI's).

Raise `ApiError` (or one of the helpers) from any handler, guard or service; Litestar's own exceptions
(validation, 404, 405, 413) and anything unexpected are turned into the same envelope here.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from litestar import MediaType, Response
from litestar.exceptions import HTTPException, ValidationException

if TYPE_CHECKING:
    from litestar import Request
    from litestar.types import ExceptionHandlersMap

log = logging.getLogger(__name__)

_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]{1,100})`")

# OpenAI's error types, by status.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
_CODE_BY_STATUS = {
    400: "bad_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    422: "invalid_value",
    429: "rate_limit_exceeded",
    503: "unavailable",
}


class ApiError(Exception):
    """An error the client should see, with its status and the envelope's fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code or _CODE_BY_STATUS.get(status_code, "error")
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(
            status_code, "server_error" if status_code >= 500 else "error"
        )
        self.headers = headers or {}


def not_found(what: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"{what} not found", param=param)


def conflict(message: str, param: str | None = None) -> ApiError:
    return ApiError(409, message, param=param)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(422, message, param=param)


def error_body(status_code: int, message: str, code: str, param: str | None, type_: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: ApiError) -> Response[Any]:
    return Response(
        content=error_body(exc.status_code, exc.message, exc.code, exc.param, exc.type),
        status_code=exc.status_code,
        media_type=MediaType.JSON,
        headers=exc.headers,
    )


def _from_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[Any]:
    return error_response(exc)


def _validation_param(exc: ValidationException) -> tuple[str | None, str]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict) and item.get("key"):
            key = str(item["key"])
            unknown = _UNKNOWN_FIELD.search(str(item.get("message", "")))
            if unknown:
                # msgspec blames the whole body ("data"); the client needs the field it sent.
                return unknown.group(1), "unknown field"
            # msgspec reports body paths as "$.field" or "$.items[0].name".
            return key.removeprefix("$."), str(item.get("message") or exc.detail)
    return None, exc.detail


def _from_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        param, message = _validation_param(exc)
        if param is not None:
            text = f"Invalid value for '{param}': {message}"
            return error_response(ApiError(422, text, param=param))
        if "JSON" in exc.detail or "decode" in exc.detail.lower():
            return error_response(ApiError(400, "Malformed JSON body", code="invalid_json"))
        return error_response(ApiError(400 if status == 400 else status, exc.detail))
    if status == 400 and ("JSON" in exc.detail or "malformed" in exc.detail.lower()):
        return error_response(ApiError(400, "Malformed JSON body", code="invalid_json"))
    if status == 404:
        return error_response(ApiError(404, f"No route for {request.method} {request.url.path}"))
    if status == 405:
        return error_response(
            ApiError(405, f"Method {request.method} not allowed on {request.url.path}", headers=exc.headers)
        )
    if status >= 500:
        log.error("server error: %s", exc.detail, exc_info=exc)
        return error_response(ApiError(status, "Internal server error", code="internal_error"))
    message = exc.detail or HTTPStatus(status).phrase
    return error_response(ApiError(status, message, headers=exc.headers))


def _from_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error", exc_info=exc)
    return error_response(ApiError(500, "Internal server error", code="internal_error", type="server_error"))


def exception_handlers() -> ExceptionHandlersMap:
    """Handlers for create_app; more specific classes win, so domains may add their own."""
    return {
        ApiError: _from_api_error,
        HTTPException: _from_http_exception,
        Exception: _from_unexpected,
    }
