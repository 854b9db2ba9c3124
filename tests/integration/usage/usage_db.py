"""Helpers for the usage tests: a migrated database, tenants, a Metering service on its own engine."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from app.domain.usage.metering import Metering
from tests.integration.conftest import PG_ADMIN_DSN


def engine_for(url: str) -> AsyncEngine:
    return create_async_engine(url, pool_pre_ping=True)


async def add_tenant(engine: AsyncEngine, name: str | None = None) -> uuid.UUID:
    from app.domain.tenants.models import Tenant

    tenant = Tenant(name=name or f"t-{uuid.uuid4().hex[:8]}", status="active")
    async with async_sessionmaker(engine, expire_on_commit=False)() as session:
        session.add(tenant)
        await session.commit()
    return tenant.id


@asynccontextmanager
async def metering_on(url: str, **kw: float) -> AsyncIterator[tuple[Metering, AsyncEngine]]:
    engine = engine_for(url)
    metering = Metering(async_sessionmaker(engine, expire_on_commit=False), **kw)
    try:
        yield metering, engine
    finally:
        await metering.stop(flush_timeout_s=1)
        await engine.dispose()


async def rename_database(old: str, new: str) -> None:
    """Take a database away from its clients (and give it back): every connection to it is cut first."""
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            old,
        )
        await conn.execute(f'ALTER DATABASE "{old}" RENAME TO "{new}"')
    finally:
        await conn.close()
