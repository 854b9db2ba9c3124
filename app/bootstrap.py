"""First-start work of `loraplex serve` on the embedded defaults: migrations, admin key, demo model."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from advanced_alchemy.exceptions import AdvancedAlchemyError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from app.config import Settings
from app.db.migrate import ensure_sqlite_dir, schema_status, upgrade
from app.domain.keys.schemas import KeyCreated
from app.domain.keys.service import ApiKeyService

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = "demo-model"


class BootstrapError(RuntimeError):
    """Start-up cannot go on; the message says what the operator should do."""


def migrate(settings: Settings) -> None:
    assert settings.database_url is not None
    ensure_sqlite_dir(settings.database_url)
    upgrade(settings.database_url, "head")


def check_schema(settings: Settings) -> None:
    """Refuse to serve a database that is not at the latest migration (PostgreSQL is migrated separately)."""
    assert settings.database_url is not None
    try:
        current, head = schema_status(settings.database_url)
    except (SQLAlchemyError, OSError) as exc:
        raise BootstrapError(f"cannot reach the database: {exc}") from exc
    if current != head:
        raise BootstrapError(
            f"the database is at migration {current or 'none'}, the code needs {head}: run `loraplex migrate`"
        )


async def _admin_key(settings: Settings, only_if_none: bool, name: str | None) -> KeyCreated | None:
    assert settings.database_url is not None and settings.secret is not None
    engine = create_async_engine(settings.database_url)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session, session.begin():
            service = ApiKeyService(session, settings.secret)
            if only_if_none and await service.count_admin_keys() > 0:
                return None
            return await service.create_admin_key(name=name)
    except (SQLAlchemyError, AdvancedAlchemyError, OSError) as exc:
        cause = exc.__cause__ or exc
        raise BootstrapError(f"cannot write the admin key ({cause}); run `loraplex migrate` first?") from exc
    finally:
        await engine.dispose()


def create_admin_key(settings: Settings, name: str | None = None) -> KeyCreated:
    key = asyncio.run(_admin_key(settings, only_if_none=False, name=name))
    assert key is not None
    return key


def first_admin_key(settings: Settings) -> KeyCreated | None:
    """A new admin key when there is no LORAPLEX_ADMIN_KEY and no admin key yet; None otherwise."""
    if settings.admin_key is not None:
        return None
    return asyncio.run(_admin_key(settings, only_if_none=True, name="first-start"))


def ensure_model(settings: Settings) -> Settings:
    """LORAPLEX_MODEL, or the demo model under data_dir (made on first start by engine.demo)."""
    if settings.model is not None:
        return settings
    folder = (settings.data_dir / DEMO_MODEL_DIR).resolve()
    try:
        from engine.demo import write_demo_model
    except ImportError:
        log.warning("no LORAPLEX_MODEL and engine.demo is not available: starting without a model")
        return settings
    # Idempotent: a complete folder is left alone, one cut short by an earlier crash is rewritten.
    log.info("demo model under %s (made on first start)", folder)
    write_demo_model(str(folder))
    return dataclasses.replace(settings, model=str(folder))


def demo_model_dir(settings: Settings) -> Path:
    return settings.data_dir / DEMO_MODEL_DIR
