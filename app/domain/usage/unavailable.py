"""A database that cannot be reached is a 503 with `Retry-After`, never a 500, on every route.

A request that cannot be metered must not run; the client should retry soon rather than report a bug.
Errors that say the query or the data is wrong (programming, data, integrity errors) stay what they
are: those are bugs or conflicts, not an outage.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.types import ExceptionHandlersMap
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.domain.usage.metering import database_down, db_unavailable
from app.errors import ApiError, error_response

log = logging.getLogger(__name__)


def _from_database_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if not database_down(exc):
        log.exception("database error", exc_info=exc)
        return error_response(
            ApiError(500, "Internal server error", code="internal_error", type="server_error")
        )
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(db_unavailable())


def database_unavailable_handlers() -> ExceptionHandlersMap:
    """Merge into create_app's handlers; the foundation's more specific ones (integrity -> 409) still win."""
    # asyncpg refusing a connection (database stopped) surfaces as a bare ConnectionError, not a DBAPIError.
    return {
        DBAPIError: _from_database_error,
        PoolTimeoutError: _from_database_error,
        ConnectionError: _from_database_error,
    }
