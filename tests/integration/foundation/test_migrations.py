"""Migrations on the real PostgreSQL: up, down, up again; and models never drift from migrations.

The drift check loads every model module of every area (app/db/models.py), so a table added by any
area without its migration, or a migration that differs from its model, fails here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from app.db.base import metadata
from app.db.migrate import MIGRATIONS_DIR, alembic_config, downgrade, upgrade
from app.db.models import load_metadata, model_modules


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def _diff(url: str, compare_type: bool = True) -> list[object]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:

            def compare(sync_conn):  # type: ignore[no-untyped-def]
                context = MigrationContext.configure(sync_conn, opts={"compare_type": compare_type})
                return compare_metadata(context, load_metadata())

            return await conn.run_sync(compare)
    finally:
        await engine.dispose()


def test_upgrade_downgrade_upgrade(pg_database_url):
    upgrade(pg_database_url, "head")
    tables = asyncio.run(_tables(pg_database_url))
    assert {"tenants", "api_keys", "alembic_version"} <= tables
    assert set(load_metadata().tables) <= tables
    downgrade(pg_database_url, "base")
    assert asyncio.run(_tables(pg_database_url)) <= {"alembic_version"}
    upgrade(pg_database_url, "head")
    assert set(load_metadata().tables) <= asyncio.run(_tables(pg_database_url))


def test_models_and_migrations_do_not_drift(migrated_database_url):
    diff = asyncio.run(_diff(migrated_database_url))
    assert diff == [], f"models and migrations differ; write a migration: {diff}"


def test_drift_check_notices_a_missing_migration(migrated_database_url):
    """The comparison must fail on drift: add a table only to the models and it must be reported."""
    from sqlalchemy import Column, Integer, Table

    probe = Table("drift_probe", metadata, Column("id", Integer, primary_key=True))
    try:
        diff = asyncio.run(_diff(migrated_database_url))
    finally:
        metadata.remove(probe)
    assert any(op[0] == "add_table" and op[1].name == "drift_probe" for op in diff)


def test_every_models_module_is_loaded():
    modules = model_modules()
    assert "app.domain.tenants.models" in modules
    assert "app.domain.keys.models" in modules
    found = {
        ".".join(p.relative_to(MIGRATIONS_DIR.parent).with_suffix("").parts)
        for p in (MIGRATIONS_DIR.parent / "app").rglob("models.py")
    }
    assert found <= set(modules)
    # A table declared outside a `models` module would escape Alembic and the drift check.
    stray = [
        str(p.relative_to(MIGRATIONS_DIR.parent))
        for p in (MIGRATIONS_DIR.parent / "app").rglob("*.py")
        if "__tablename__" in p.read_text() and p.stem != "models" and p.parent.name != "models"
    ]
    assert stray == [], f"tables outside a models module: {stray}"


def test_revisions_form_one_chain_starting_at_0001():
    script = ScriptDirectory.from_config(alembic_config("sqlite+aiosqlite://"))
    heads = script.get_heads()
    assert len(heads) == 1, f"more than one head: {heads}"
    chain = [rev.revision for rev in script.walk_revisions("base", "heads")]
    assert chain[-1] == "0001_tenants_keys"
    for path in Path(MIGRATIONS_DIR, "versions").glob("*.py"):
        assert path.stem in chain, f"{path.name} is not in the chain"


def test_sqlite_round_trip(tmp_path):
    """The embedded default. Types are compared on PostgreSQL only: SQLite reflects UUIDs as NUMERIC."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url, "head")
    assert set(load_metadata().tables) <= asyncio.run(_tables(url))
    downgrade(url, "base")
    assert asyncio.run(_tables(url)) <= {"alembic_version"}
    upgrade(url, "head")
    assert asyncio.run(_diff(url, compare_type=False)) == []


def test_serve_refuses_a_database_behind_the_code(pg_database_url):
    import dataclasses

    from app.bootstrap import BootstrapError, check_schema
    from app.config import Settings

    settings = dataclasses.replace(Settings(), database_url=pg_database_url)
    try:
        check_schema(settings)
    except BootstrapError as err:
        assert "loraplex migrate" in str(err) and "none" in str(err)
    else:
        raise AssertionError("an empty database was accepted")
    upgrade(pg_database_url, "head")
    check_schema(settings)  # at head: no error
    unreachable = dataclasses.replace(
        settings, database_url="postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"
    )
    try:
        check_schema(unreachable)
    except BootstrapError as err:
        assert "cannot reach the database" in str(err)
    else:
        raise AssertionError("an unreachable database was accepted")
