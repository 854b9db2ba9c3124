"""Real services for integration tests: PostgreSQL databases, Redis, and moto's S3 server, plus the app
on them.

PostgreSQL (127.0.0.1:5432, trust auth) and Redis (127.0.0.1:6379) are started by .ci/run when down;
the S3 server is moto's, started here on a free loopback port.

App fixtures (see docs/foundation.md, "Adding a domain"):
- `migrated_database_url`: a database at the head migration, emptied before each test (one per session).
- `app_settings`: Settings on that database, with a test secret and `TEST_ADMIN_KEY` as the admin key.
- `build_app(database_url=None, **overrides)`: a new app (default: the migrated database), for
  tests that need other settings (e.g. `redis_url=...`).
- `app`, `client` (litestar TestClient, started), `async_client` (AsyncTestClient, started).
- `admin_headers`; `make_tenant(**fields) -> dict`; `make_key(tenant_id, scopes=("completions",)) -> str`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.testing import AsyncTestClient, TestClient

    from app.config import Settings

TEST_SECRET = "test-secret-0123456789abcdef"
TEST_ADMIN_KEY = "lpx_testadminkey0123456789"

PG_ADMIN_DSN = os.environ.get("LORAPLEX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LORAPLEX_TEST_REDIS", "redis://127.0.0.1:6379/15")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _create_db(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_db(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test; dropped afterwards. Returns an asyncpg SQLAlchemy URL."""
    import asyncio

    name = f"lpx_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_db(name))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_drop_db(name))


@pytest.fixture
def redis_url() -> Iterator[str]:
    """Redis database 15, flushed before and after the test."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()


@contextmanager
def moto_s3(bucket: str) -> Iterator[dict[str, str]]:
    """moto's S3 server over HTTP on a free loopback port, with `bucket` made; stopped on exit."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    info = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "bucket": bucket,
        "region": "us-east-1",
        "access_key_id": "testing",
        "secret_access_key": "testing",
    }
    boto3.client(
        "s3",
        endpoint_url=info["endpoint_url"],
        region_name=info["region"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    try:
        yield info
    finally:
        server.stop()


@pytest.fixture
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server for one test."""
    with moto_s3("loraplex-test") as info:
        yield info


# ---- the app on a migrated database ----


def _asyncpg_url(name: str) -> str:
    return f"{PG_ADMIN_DSN.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+asyncpg://', 1)}/{name}"


@pytest.fixture(scope="session")
def _session_database() -> Iterator[str]:
    """One database migrated to head per test session (creating and dropping one costs ~1 s each)."""
    import asyncio

    from app.db.migrate import upgrade

    name = f"lpx_s_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_db(name))
    try:
        upgrade(_asyncpg_url(name), "head")
        yield name
    finally:
        asyncio.run(_drop_db(name))


async def _empty_tables(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}")
    try:
        # A connection left open by an earlier test must fail this loudly, not hang it.
        await conn.execute("SET lock_timeout = '10s'")
        tables = [
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            if r["tablename"] != "alembic_version"
        ]
        if tables:
            quoted = ", ".join(f'"{table}"' for table in tables)
            await conn.execute(f"TRUNCATE {quoted} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture
def migrated_database_url(_session_database: str) -> str:
    """The session's database at the head migration, emptied before this test. Share it, don't change
    its schema: a test that migrates up and down takes `pg_database_url` instead."""
    import asyncio

    asyncio.run(_empty_tables(_session_database))
    return _asyncpg_url(_session_database)


@pytest.fixture
def build_app(migrated_database_url: str, tmp_path: Path) -> Callable[..., Litestar]:
    from app.config import Settings
    from app.main import create_app

    def build(database_url: str | None = None, **overrides: Any) -> Litestar:
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=database_url or migrated_database_url,
            secret=TEST_SECRET,
            admin_key=TEST_ADMIN_KEY,
            log_format="json",
        )
        return create_app(dataclasses.replace(settings, **overrides))

    return build


@pytest.fixture
def app(build_app: Callable[..., Litestar]) -> Litestar:
    return build_app()


@pytest.fixture
def app_settings(app: Litestar) -> Settings:
    return app.state.settings  # type: ignore[no-any-return]


@pytest.fixture
def client(app: Litestar) -> Iterator[TestClient[Litestar]]:
    from litestar.testing import TestClient

    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
async def async_client(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    from litestar.testing import AsyncTestClient

    async with AsyncTestClient(app) as test_client:
        yield test_client


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}


@pytest.fixture
def make_tenant(client: TestClient[Litestar], admin_headers: dict[str, str]) -> Callable[..., dict[str, Any]]:
    counter = iter(range(1_000_000))

    def make(**fields: Any) -> dict[str, Any]:
        fields.setdefault("name", f"tenant-{next(counter)}")
        response = client.post("/admin/tenants", json=fields, headers=admin_headers)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    return make


@pytest.fixture
def make_key(client: TestClient[Litestar], admin_headers: dict[str, str]) -> Callable[..., str]:
    def make(tenant_id: str, scopes: tuple[str, ...] = ("completions",), **fields: Any) -> str:
        body = {"scopes": list(scopes), **fields}
        response = client.post(f"/admin/tenants/{tenant_id}/api-keys", json=body, headers=admin_headers)
        assert response.status_code == 201, response.text
        return response.json()["key"]  # type: ignore[no-any-return]

    return make
