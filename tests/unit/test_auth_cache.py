"""The key cache: revocation and suspension reach a cached key within the TTL; expiry is exact."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from app.auth.authenticator import KeyAuthenticator
from app.db.migrate import upgrade
from app.domain.keys.models import ApiKey
from app.domain.keys.schemas import KeyCreate
from app.domain.keys.service import ApiKeyService
from app.domain.tenants.models import Tenant
from app.errors import ApiError

SECRET = "unit-secret-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}"
    upgrade(url)
    return url


async def _setup(url: str):
    engine = create_async_engine(url)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    async with maker() as session, session.begin():
        tenant = Tenant(name="t", status="active")
        session.add(tenant)
        await session.flush()
        created = await ApiKeyService(session, SECRET).create_tenant_key(
            tenant.id, KeyCreate(scopes=["completions"])
        )
    return engine, maker, tenant.id, created


async def _status(auth: KeyAuthenticator, key: str) -> int:
    try:
        await auth.authenticate(key)
    except ApiError as err:
        return err.status_code
    return 200


def test_revocation_in_another_process_is_seen_after_the_ttl(db):
    async def run() -> None:
        engine, maker, _, created = await _setup(db)
        clock = Clock()
        auth = KeyAuthenticator(maker, SECRET, None, ttl_seconds=2.0, clock=clock)
        assert await _status(auth, created.key) == 200
        async with maker() as session, session.begin():
            await session.execute(update(ApiKey).values(revoked_at=datetime.now(UTC)))
        clock.now += 1.9
        assert await _status(auth, created.key) == 200  # cached, inside the TTL
        clock.now += 0.2
        assert await _status(auth, created.key) == 401
        await engine.dispose()

    asyncio.run(run())


def test_suspension_is_seen_after_the_ttl_and_forget_tenant_is_immediate(db):
    async def run() -> None:
        engine, maker, tenant_id, created = await _setup(db)
        clock = Clock()
        auth = KeyAuthenticator(maker, SECRET, None, ttl_seconds=2.0, clock=clock)
        assert await _status(auth, created.key) == 200
        async with maker() as session, session.begin():
            await session.execute(update(Tenant).values(status="suspended"))
        assert await _status(auth, created.key) == 200
        auth.forget_tenant(tenant_id)
        assert await _status(auth, created.key) == 403
        await engine.dispose()

    asyncio.run(run())


def test_expiry_is_checked_on_every_call_even_when_cached(db):
    async def run() -> None:
        engine, maker, _, created = await _setup(db)
        soon = datetime.now(UTC) + timedelta(milliseconds=300)
        async with maker() as session, session.begin():
            await session.execute(update(ApiKey).values(expires_at=soon))
        auth = KeyAuthenticator(maker, SECRET, None, ttl_seconds=5.0, clock=Clock())
        assert await _status(auth, created.key) == 200
        await asyncio.sleep(0.4)
        assert await _status(auth, created.key) == 401
        await engine.dispose()

    asyncio.run(run())


def test_a_different_secret_recognises_no_key(db):
    async def run() -> None:
        engine, maker, _, created = await _setup(db)
        auth = KeyAuthenticator(maker, "another-secret-0123456789", None, ttl_seconds=2.0)
        assert await _status(auth, created.key) == 401
        await engine.dispose()

    asyncio.run(run())
