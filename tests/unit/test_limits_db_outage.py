"""Which database errors count as an outage (503, settle deferred and retried) and which are bugs."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy.exc import DataError, DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.domain.usage.metering import database_down


class PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def wrapped(cause: BaseException, cls: type[DBAPIError] = DBAPIError) -> DBAPIError:
    orig = Exception("translated")
    orig.__cause__ = cause
    return cls("UPDATE usage_records ...", {}, orig)


@pytest.mark.parametrize(
    ("exc", "down"),
    [
        (wrapped(ConnectionRefusedError(111, "refused")), True),
        (wrapped(PgError("3D000")), True),  # database renamed or dropped
        (wrapped(PgError("57P01")), True),  # admin shutdown
        (wrapped(PgError("08006")), True),  # connection failure
        (wrapped(PgError("53300")), True),  # too many connections
        (wrapped(PgError("55000")), True),  # database not accepting connections
        (wrapped(PgError("22003")), False),  # numeric value out of range: our bug
        (wrapped(PgError("42P01")), False),  # undefined table: our bug
        (wrapped(ValueError("invalid input for query argument $1")), False),
        (wrapped(sqlite3.OperationalError("database is locked"), OperationalError), True),
        (wrapped(sqlite3.OperationalError("no such table: usage_records"), OperationalError), False),
        (wrapped(PgError("08006"), DataError), False),
        (wrapped(PgError("08006"), ProgrammingError), False),
        (PoolTimeoutError("pool exhausted"), True),
        (TimeoutError(), True),
        (ValueError("nothing to do with a database"), False),
    ],
)
def test_outage_or_bug(exc: BaseException, down: bool) -> None:
    assert database_down(exc) is down


def test_an_invalidated_connection_is_an_outage() -> None:
    exc = DBAPIError("SELECT 1", {}, Exception("closed"), connection_invalidated=True)
    assert database_down(exc)


def test_a_refused_connection_on_any_route_is_a_503() -> None:
    """asyncpg raises a bare ConnectionRefusedError when PostgreSQL is stopped; no route may turn it into a 500."""
    from litestar import Litestar, get
    from litestar.testing import TestClient

    from app.domain.usage.unavailable import database_unavailable_handlers

    @get("/boom", sync_to_thread=False)
    def boom() -> None:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")

    @get("/bug", sync_to_thread=False)
    def bug() -> None:
        raise wrapped(PgError("42P01"), ProgrammingError)

    app = Litestar([boom, bug], exception_handlers=database_unavailable_handlers())
    with TestClient(app) as client:
        down = client.get("/boom")
        assert down.status_code == 503 and down.json()["error"]["code"] == "database_unavailable"
        assert client.get("/bug").status_code == 500
