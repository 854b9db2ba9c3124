"""Engine and sessions through advanced-alchemy's Litestar plugin.

Handlers receive `db_session: AsyncSession` by dependency injection; it commits when the response is
2xx and rolls back otherwise, so a failed request never leaves half its writes behind. The completion
routes take none: they would hold a connection across a whole generation (docs/reliability.md). Code running
outside a request (background tasks, lifespan hooks) opens its own session with `session_maker(app)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from advanced_alchemy.extensions.litestar import (
    AsyncSessionConfig,
    EngineConfig,
    SQLAlchemyAsyncConfig,
    SQLAlchemyPlugin,
)
from sqlalchemy import event

from app.db.models import load_metadata

if TYPE_CHECKING:
    from litestar import Litestar
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

    from app.config import Settings

DB_CONFIG_STATE_KEY = "db_config"


def make_db_config(settings: Settings) -> SQLAlchemyAsyncConfig:
    url = settings.database_url
    assert url is not None, "Settings.from_env fills in database_url"
    size, overflow = settings.pool_sizing
    # No query of a request waits long for a connection: past the pool timeout it is a 503 with
    # Retry-After (app/domain/usage/unavailable.py), not a request stuck behind the others.
    timeout = max(1, math.ceil(settings.db_pool_timeout_seconds))  # whole seconds: EngineConfig types it so
    if settings.is_sqlite:
        # SQLite's own wait for its write lock; usage writes of this process queue before it (metering).
        engine_config = EngineConfig(
            connect_args={"timeout": 30}, pool_size=size, max_overflow=overflow, pool_timeout=timeout
        )
    else:
        engine_config = EngineConfig(
            pool_pre_ping=True, pool_size=size, max_overflow=overflow, pool_timeout=timeout
        )
    config = SQLAlchemyAsyncConfig(
        connection_string=url,
        metadata=load_metadata(),
        session_config=AsyncSessionConfig(expire_on_commit=False),
        engine_config=engine_config,
        before_send_handler="autocommit",
        session_dependency_key="db_session",
        create_all=False,
        # Our own handlers (app/errors.py) put repository errors into the error envelope.
        set_default_exception_handler=False,
    )
    if settings.is_sqlite:
        _sqlite_foreign_keys(config.get_engine())
    return config


def _sqlite_foreign_keys(engine: AsyncEngine) -> None:
    # SQLite ignores ON DELETE CASCADE and FK checks unless asked, per connection. WAL lets requests read
    # while another writes (usage rows, last_used_at), instead of failing with "database is locked".
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def make_db_plugin(config: SQLAlchemyAsyncConfig) -> SQLAlchemyPlugin:
    return SQLAlchemyPlugin(config=config)


def db_config(app: Litestar) -> SQLAlchemyAsyncConfig:
    return cast("SQLAlchemyAsyncConfig", app.state[DB_CONFIG_STATE_KEY])


def session_maker(app: Litestar) -> Callable[[], AsyncSession]:
    """A session factory for work outside a request; use as `async with session_maker(app)() as s:`."""
    return db_config(app).create_session_maker()
