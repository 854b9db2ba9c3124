"""Real services for integration tests: a fresh PostgreSQL database per session, Redis, and moto's S3 server.

PostgreSQL (127.0.0.1:5432, trust auth) and Redis (127.0.0.1:6379) are started by .ci/run when down;
the S3 server is moto's, started here on a free loopback port.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

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


@pytest.fixture
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server over HTTP on a free loopback port, with a bucket made; stopped afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    info = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "bucket": "loraplex-test",
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
    ).create_bucket(Bucket=info["bucket"])
    try:
        yield info
    finally:
        server.stop()
