"""The error envelope for errors raised outside any route: repository errors, strict-body parsing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import msgspec
from advanced_alchemy.exceptions import DuplicateKeyError, IntegrityError, NotFoundError
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import OperationalError

from app.domain.strict import validation_error
from app.errors import ApiError, error_response, exception_handlers


def _handle(exc: Exception):
    handlers = exception_handlers()
    for cls in type(exc).__mro__:
        if cls in handlers:
            request = SimpleNamespace(
                method="GET", url=SimpleNamespace(path="/x"), app=SimpleNamespace(exception_handlers=handlers)
            )
            return handlers[cls](request, exc)
    raise AssertionError("no handler")


def _raised(exc: Exception, cause: BaseException) -> Exception:
    try:
        raise exc from cause
    except Exception as err:
        return err


def test_constraint_violations_are_409_but_operational_failures_are_500():
    unique = _raised(DuplicateKeyError("dup"), SAIntegrityError("INSERT", {}, Exception("unique")))
    assert _handle(unique).status_code == 409
    constraint = _raised(IntegrityError("x"), SAIntegrityError("INSERT", {}, Exception("check")))
    assert _handle(constraint).status_code == 409
    missing_table = _raised(IntegrityError("x"), OperationalError("INSERT", {}, Exception("no such table")))
    response = _handle(missing_table)
    assert response.status_code == 500
    assert "no such table" not in json.dumps(response.content)
    assert _handle(NotFoundError("gone")).status_code == 404
    assert _handle(RuntimeError("secret detail")).content["error"]["message"] == "Internal server error"


def test_api_error_defaults_follow_openai_types():
    for status, type_ in [
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
    ]:
        error = error_response(ApiError(status, "m")).content["error"]
        assert error["type"] == type_ and error["message"] == "m" and error["param"] is None


def test_strict_validation_errors_name_the_field():
    class Body(msgspec.Struct, forbid_unknown_fields=True):
        count: int
        items: list[str] = []

    cases = [
        (b'{"count": "1"}', "count"),
        (b'{"count": 1, "items": [1]}', "items[0]"),
        (b'{"count": 1, "extra": 1}', "extra"),
        (b"{}", "count"),
        (b"[]", None),
    ]
    for raw, param in cases:
        try:
            msgspec.json.decode(raw, type=Body, strict=True)
        except msgspec.ValidationError as exc:
            err = validation_error(exc)
        else:
            raise AssertionError(raw)
        assert err.status_code == 422
        if param is not None:
            assert err.param == param, (raw, err.param)


def test_wrapped_driver_errors_are_answered_as_the_driver_error():
    """advanced-alchemy wraps a lost connection in its own error; the app's handler for the driver's error
    (an outage: 503) must still answer, not a generic 500."""
    lost = OperationalError("SELECT", {}, ConnectionRefusedError("refused"))
    wrapped = _raised(IntegrityError("x"), lost)
    seen = []

    def outage(request, exc):
        seen.append(exc)
        return error_response(ApiError(503, "Database unavailable", code="database_unavailable"))

    handlers = {**exception_handlers(), OperationalError: outage}
    request = SimpleNamespace(
        method="GET", url=SimpleNamespace(path="/x"), app=SimpleNamespace(exception_handlers=handlers)
    )
    response = handlers[IntegrityError](request, wrapped)
    assert response.status_code == 503 and seen == [lost]
