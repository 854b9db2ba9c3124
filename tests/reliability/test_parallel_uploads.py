"""10 parallel uploads of one adapter name, with and without Idempotency-Keys: no 500, distinct versions
(or a 409 that a retry resolves), and no row left `pending`.

Before the fix four of ten got a 500 (the version-collision retry read the row after a rollback) and
their rows stayed `pending`, with their Idempotency-Keys answering 409 for an hour.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ADMIN, LiveServer
from tests.reliability.conftest import execute

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.timeout(180)]

PARALLEL = 10


def _adapter(server: LiveServer, folder: Path, seed: int) -> dict[str, tuple[str, bytes]]:
    from engine.demo import write_adapter

    cfg = json.loads((server.demo_model / "config.json").read_text())
    path = write_adapter(folder / f"a{seed}", cfg, r=4, lora_alpha=8, target_modules=["q_proj"], seed=seed)
    return {
        "adapter_config": ("adapter_config.json", (path / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (path / "adapter_model.safetensors").read_bytes()),
    }


async def _upload_until_done(
    client: httpx.AsyncClient, url: str, files: dict[str, Any], key: str | None, seen: list[int]
) -> dict[str, Any]:
    """Upload; a 409 is allowed only as 'retry', and the retry must resolve it."""
    headers = {"Idempotency-Key": key} if key else {}
    for _ in range(10):
        r = await client.post(url, data={"name": "same"}, files=files, headers=headers)
        seen.append(r.status_code)
        if r.status_code == 201:
            return dict(r.json())
        assert r.status_code == 409, r.text
        await asyncio.sleep(0.2)
    raise AssertionError("a 409 that retries never resolved")


def _parallel(
    server: LiveServer, tenant_id: str, uploads: list[tuple[dict[str, Any], str | None]]
) -> tuple[list[dict[str, Any]], list[int]]:
    url = f"/admin/tenants/{tenant_id}/adapters"
    seen: list[int] = []
    health: list[float] = []

    async def poll_health(client: httpx.AsyncClient, done: asyncio.Event) -> None:
        while not done.is_set():
            started = time.perf_counter()
            assert (await client.get("/health")).status_code == 200
            health.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)

    async def main() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=server.url, headers=ADMIN, timeout=60) as client:
            done = asyncio.Event()
            poller = asyncio.ensure_future(poll_health(client, done))
            try:
                return list(
                    await asyncio.gather(*(_upload_until_done(client, url, f, k, seen) for f, k in uploads))
                )
            finally:
                done.set()
                await poller

    results = asyncio.run(main())
    # Hashing and validation run in worker threads: /health answers while ten uploads are processed.
    print(f"/health during uploads: {len(health)} probes, max {max(health, default=0) * 1000:.0f} ms")
    assert max(health, default=0.0) < 1.0
    return results, seen


def _statuses(server: LiveServer, tenant_id: str) -> list[str]:
    url = server.app.state.settings.database_url
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url.split(":///", 1)[1], timeout=30) as conn:
            # advanced-alchemy's GUID is 16 bytes in SQLite (text where binary is off).
            query = "SELECT status FROM adapters WHERE lower(hex(tenant_id)) = ? OR tenant_id = ?"
            return [r[0] for r in conn.execute(query, (tenant_id.replace("-", ""), tenant_id))]
    import asyncpg

    async def fetch() -> list[str]:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
        try:
            return [
                r[0]
                for r in await conn.fetch("SELECT status FROM adapters WHERE tenant_id = $1::uuid", tenant_id)
            ]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def _check_parallel_uploads(server: LiveServer, tmp_path: Path) -> None:
    tenant = server.tenant()
    # Without keys: ten different adapters of one name get ten distinct versions.
    plain, seen = _parallel(
        server, tenant["id"], [(_adapter(server, tmp_path, s), None) for s in range(PARALLEL)]
    )
    assert sorted(a["version"] for a in plain) == list(range(1, PARALLEL + 1))
    # With a key each: the same, continuing the numbering.
    keyed, seen_keyed = _parallel(
        server, tenant["id"], [(_adapter(server, tmp_path, 100 + s), f"k-{s}") for s in range(PARALLEL)]
    )
    assert sorted(a["version"] for a in keyed) == list(range(PARALLEL + 1, 2 * PARALLEL + 1))
    # One key sent ten times at once (a client retrying eagerly): one adapter, the others replay it.
    same = _adapter(server, tmp_path, 500)
    replays, seen_same = _parallel(server, tenant["id"], [(same, "one-key")] * PARALLEL)
    assert len({a["id"] for a in replays}) == 1 and replays[0]["version"] == 2 * PARALLEL + 1
    assert 500 not in seen + seen_keyed + seen_same
    print("upload statuses:", *(Counter(x) for x in (seen, seen_keyed, seen_same)))
    statuses = _statuses(server, tenant["id"])
    assert statuses.count("ready") == 2 * PARALLEL + 1 and "pending" not in statuses, statuses


def test_parallel_uploads_on_postgres(pg_server: LiveServer, tmp_path: Path) -> None:
    _check_parallel_uploads(pg_server, tmp_path)


def test_parallel_uploads_on_sqlite(sqlite_server: LiveServer, tmp_path: Path) -> None:
    _check_parallel_uploads(sqlite_server, tmp_path)


def test_a_pending_row_of_a_dead_upload_fails_and_frees_its_key(
    pg_server: LiveServer, tmp_path: Path
) -> None:
    """An upload whose process died leaves a `pending` row without heartbeats: the pending sweep fails
    it, and a retry with the same Idempotency-Key then succeeds (before: 409 for an hour)."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from app.domain.adapters.sweep import fail_stale_pending

    tenant = pg_server.tenant()
    url = pg_server.app.state.settings.database_url
    files = _adapter(pg_server, tmp_path, 900)
    stale = (datetime.now(UTC) - timedelta(minutes=2)).isoformat()
    execute(
        url,
        "INSERT INTO adapters (id, tenant_id, name, version, status, rank, alpha, use_rslora, target_modules,"
        " sha256, config_sha256, size_bytes, warnings, idempotency_key, created_at, updated_at) VALUES"
        f" (gen_random_uuid(), '{tenant['id']}', 'same', NULL, 'pending', 4, 8, false, '[\"q_proj\"]',"
        f" '{'0' * 64}', '{'0' * 64}', 1, '[]', 'dead-key', '{stale}', '{stale}')",
    )
    r = httpx.post(
        pg_server.url + f"/admin/tenants/{tenant['id']}/adapters",
        data={"name": "same"}, files=files, headers={**ADMIN, "Idempotency-Key": "dead-key"}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 409, r.text  # still looks in flight

    async def sweep() -> int:
        engine = create_async_engine(url)
        try:
            return await fail_stale_pending(async_sessionmaker(engine, expire_on_commit=False))
        finally:
            await engine.dispose()

    assert asyncio.run(sweep()) == 1
    r = httpx.post(
        pg_server.url + f"/admin/tenants/{tenant['id']}/adapters",
        data={"name": "same"}, files=files, headers={**ADMIN, "Idempotency-Key": "dead-key"}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 201, r.text
    assert "pending" not in _statuses(pg_server, tenant["id"])
