"""A real loraplex server on loopback for end-to-end tests: uvicorn in a thread, the demo model on CPU,
real PostgreSQL, Redis and (where a module asks for it) moto's S3 server over HTTP.

One server per test module (`live_server`), because starting the engine costs a few seconds on 2 cores.
The server runs in this process so a test can reach the engine behind it (to break it on purpose).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import free_port, moto_s3

PG_ADMIN_DSN = os.environ.get("LORAPLEX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LORAPLEX_TEST_REDIS", "redis://127.0.0.1:6379/15")
TEST_SECRET = "e2e-secret-0123456789abcdef"
TEST_ADMIN_KEY = "lpx_e2eadminkey0123456789"
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}


async def _pg(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")


@pytest.fixture(scope="module")
def module_database() -> Iterator[str]:
    """A fresh PostgreSQL database migrated to head, for one module's server."""
    from app.db.migrate import upgrade

    name = f"lpx_e2e_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1) + f"/{name}"
    upgrade(url, "head")
    try:
        yield url
    finally:
        asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def module_s3() -> Iterator[dict[str, str]]:
    with moto_s3("loraplex-e2e") as info:
        yield info


class LiveServer:
    """A running app: its URL, the Litestar object behind it, and admin helpers."""

    def __init__(self, app: Any, port: int, demo_model: Path) -> None:
        import uvicorn

        self.app = app
        self.demo_model = demo_model
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="e2e-uvicorn", daemon=True)
        self.admin = httpx.Client(base_url=self.url, headers=ADMIN, timeout=60)

    def start(self, ready_timeout: float = 120.0, until: int = 200) -> None:
        """Start, and wait until /ready answers `until` (503 for a server expected never to be ready)."""
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.admin.get("/ready")
                if last.status_code == until and (until == 200 or "model loading" not in last.text):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready: {last.text if last is not None else 'no answer'}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.admin.close()

    @property
    def serving(self) -> Any:
        return self.app.state["serving"]

    # ---- admin helpers (the documented admin API) -----------------------------------------------
    def tenant(self, **fields: Any) -> dict[str, Any]:
        fields.setdefault("name", f"t-{uuid.uuid4().hex[:8]}")
        r = self.admin.post("/admin/tenants", json=fields)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def key(self, tenant_id: str, scopes: tuple[str, ...] = ("completions",)) -> str:
        r = self.admin.post(
            f"/admin/tenants/{tenant_id}/api-keys", json={"name": "e2e", "scopes": list(scopes)}
        )
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    def upload(self, tenant_id: str, name: str, folder: Path) -> dict[str, Any]:
        files = {
            "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
        }
        r = self.admin.post(f"/admin/tenants/{tenant_id}/adapters", data={"name": name}, files=files)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def openai(self, key: str, **kw: Any) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def usage_rows(self) -> list[dict[str, Any]]:
        """Every usage row, straight from the database (what billing is computed from)."""
        return read_usage(self.app.state.settings.database_url)


def read_usage(database_url: str) -> list[dict[str, Any]]:
    """Every usage row of a database (PostgreSQL or SQLite), read without the app."""
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.split(":///", 1)[1], timeout=30) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM usage_records ORDER BY created_at")]
    import asyncpg

    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
        try:
            return [dict(r) for r in await conn.fetch("SELECT * FROM usage_records ORDER BY created_at")]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def start_server(
    demo_model: Path, data_dir: Path, database_url: str, until: int = 200, **overrides: Any
) -> LiveServer:
    from app.config import Settings
    from app.main import create_app

    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        redis_url=REDIS_URL,
        redis_key_prefix=f"e2e_{uuid.uuid4().hex[:8]}",
        secret=TEST_SECRET,
        admin_key=TEST_ADMIN_KEY,
        model=str(demo_model),
        device="cpu",
        max_model_len=512,
        kv_cache_bytes=8 << 20,
        log_format="json",
        log_level="WARNING",
    )
    server = LiveServer(create_app(dataclasses.replace(settings, **overrides)), free_port(), demo_model)
    server.start(until=until)
    return server


@pytest.fixture(scope="module")
def live_server(
    demo_model: Path,
    module_database: str,
    module_s3: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    server = start_server(
        demo_model,
        tmp_path_factory.mktemp("data"),
        module_database,
        s3_endpoint_url=module_s3["endpoint_url"],
        s3_bucket=module_s3["bucket"],
        s3_region=module_s3["region"],
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
    )
    try:
        yield server
    finally:
        server.stop()


def error_of(exc: Any) -> dict[str, Any]:
    """The OpenAI error object of an SDK exception (the SDK keeps either the envelope or its inside)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    return dict(body.get("error", body))
