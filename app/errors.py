"""One error shape everywhere: `{"error": {"message", "type", "param", "code"}}` (OpenAI's).

Raise `ApiError` (or one of the helpers) from any handler, guard or service; Litestar's own exceptions
(validation, 404, 405, 413) and anything unexpected are turned into the same envelope here.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import msgspec
from advanced_alchemy.exceptions import DuplicateKeyError, ForeignKeyError, IntegrityError, NotFoundError
from litestar import MediaType, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from sqlalchemy.exc import IntegrityError as SAIntegrityError

if TYPE_CHECKING:
    from litestar import Request
    from litestar.types import ExceptionHandlersMap

log = logging.getLogger(__name__)

_FIELD_IN_MESSAGE = re.compile(r"(unknown|missing required) field `([^`]{1,100})`")

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
            message = str(item.get("message") or exc.detail)
            named = _FIELD_IN_MESSAGE.search(message)
            if named:
                # msgspec blames the whole body ("data"); the client needs the field it sent or missed.
                return named.group(2), f"{named.group(1)} field"
            if key == "data":
                return None, message
            # msgspec reports nested paths as "$.field" or "$.items[0].name".
            return key.removeprefix("$."), message
    return None, exc.detail


def _is_decode_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, SerializationException) or (
            isinstance(seen, msgspec.DecodeError) and not isinstance(seen, msgspec.ValidationError)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _from_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    if status == 400 and _is_decode_error(exc):
        return error_response(ApiError(400, "Malformed JSON body", code="invalid_json"))
    if isinstance(exc, ValidationException):
        param, message = _validation_param(exc)
        if param is not None:
            return error_response(ApiError(422, f"Invalid value for '{param}': {message}", param=param))
        return error_response(ApiError(422, f"Invalid request body: {message}"))
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


def _from_repository(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # Services check first; these catch the races (two creates of one name at once) and missed checks.
    if isinstance(exc, NotFoundError):
        return error_response(ApiError(404, "Not found"))
    # advanced-alchemy also wraps operational failures (a missing table, a dropped connection) in its
    # IntegrityError; only a real constraint violation is the client's conflict.
    if isinstance(exc, DuplicateKeyError | ForeignKeyError) or isinstance(exc.__cause__, SAIntegrityError):
        log.info("constraint violation turned into 409: %s", exc.__cause__ or exc)
        return error_response(ApiError(409, "Conflicts with an existing record"))
    # Otherwise answer as for the driver's error itself (an unreachable database is a 503 app-wide).
    cause = exc.__cause__
    if isinstance(cause, Exception):
        handlers = request.app.exception_handlers
        for cls in type(cause).__mro__:
            handler = handlers.get(cls)
            if handler is not None and handler not in (_from_repository, _from_unexpected):
                return handler(request, cause)  # type: ignore[no-any-return]
    return _from_unexpected(request, exc)


def _from_recursion(request: Request[Any, Any, Any], exc: RecursionError) -> Response[Any]:
    # msgspec gives up on absurdly nested JSON with a RecursionError: the client's input, not our bug.
    if "deserializing" in str(exc):
        return error_response(ApiError(400, "Malformed JSON body: nested too deeply", code="invalid_json"))
    return _from_unexpected(request, exc)


def _from_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error", exc_info=exc)
    return error_response(ApiError(500, "Internal server error", code="internal_error", type="server_error"))


def exception_handlers() -> ExceptionHandlersMap:
    """Handlers for create_app; more specific classes win, so domains may add their own."""
    return {
        ApiError: _from_api_error,
        HTTPException: _from_http_exception,
        NotFoundError: _from_repository,
        DuplicateKeyError: _from_repository,
        ForeignKeyError: _from_repository,
        IntegrityError: _from_repository,
        RecursionError: _from_recursion,
        Exception: _from_unexpected,
    }
