"""Tenant API keys on the real PostgreSQL: shown once, stored hashed, scoped, expiring, revocable."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from app.auth.keys import hash_key, looks_like_key
from tests.integration.conftest import TEST_SECRET


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _fetch(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def test_create_shows_key_once_and_list_never(client, admin_headers, make_tenant):
    tenant = make_tenant()
    created = client.post(
        f"/admin/tenants/{tenant['id']}/api-keys",
        json={"name": "ci", "scopes": ["completions", "billing"]},
        headers=admin_headers,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert looks_like_key(body["key"])
    assert body["key"].startswith(body["prefix"])
    assert body["scopes"] == ["billing", "completions"]
    assert body["tenant_id"] == tenant["id"]

    listed = client.get(f"/admin/tenants/{tenant['id']}/api-keys", headers=admin_headers)
    assert listed.status_code == 200
    keys = listed.json()["data"]
    assert [k["id"] for k in keys] == [body["id"]]
    assert "key" not in keys[0]
    assert body["key"] not in listed.text
    assert keys[0]["prefix"] == body["prefix"]


def test_key_store_never_holds_the_plaintext(client, make_tenant, make_key, migrated_database_url):
    tenant = make_tenant()
    key = make_key(tenant["id"])
    assert client.get("/admin/tenants", headers=_bearer(key)).status_code == 403  # the key works

    rows = asyncio.run(_fetch(migrated_database_url, "SELECT * FROM api_keys"))
    assert len(rows) == 1
    secret_part = key[len("lpx_") + 8 :]
    for value in rows[0].values():
        text = str(value)
        assert key not in text
        assert secret_part not in text
    # The whole table as text, so a column added later is searched too.
    dump = asyncio.run(_fetch(migrated_database_url, "SELECT t::text AS row FROM api_keys t"))
    assert key not in dump[0]["row"] and secret_part not in dump[0]["row"]
    assert rows[0]["key_hash"] == hash_key(TEST_SECRET, key)


def test_keys_of_unknown_tenant_404(client, admin_headers):
    missing = uuid.uuid4()
    assert (
        client.post(f"/admin/tenants/{missing}/api-keys", json={}, headers=admin_headers).status_code == 404
    )
    assert client.get(f"/admin/tenants/{missing}/api-keys", headers=admin_headers).status_code == 404
    assert client.delete(f"/admin/api-keys/{missing}", headers=admin_headers).status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"scopes": ["admin"]}, "scopes"),
        ({"scopes": []}, "scopes"),
        ({"scopes": "completions"}, "scopes"),
        ({"name": "x" * 65}, "name"),
        ({"name": "bad name"}, "name"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "2999-01-01T00:00:00"}, "expires_at"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"tenant_id": str(uuid.uuid4())}, "tenant_id"),
    ],
)
def test_bad_key_requests_422_name_the_field(
    client, admin_headers, make_tenant, migrated_database_url, body, param
):
    tenant = make_tenant()
    response = client.post(f"/admin/tenants/{tenant['id']}/api-keys", json=body, headers=admin_headers)
    assert response.status_code == 422, response.text
    # A list item is named with its index ("scopes[0]").
    assert response.json()["error"]["param"].split("[")[0] == param
    assert asyncio.run(_fetch(migrated_database_url, "SELECT id FROM api_keys")) == []


def test_revoked_key_is_refused_at_once(client, admin_headers, make_tenant):
    tenant = make_tenant()
    created = client.post(f"/admin/tenants/{tenant['id']}/api-keys", json={}, headers=admin_headers).json()
    # Warm the cache, then revoke: this process must not serve the cached entry.
    assert client.get("/admin/tenants", headers=_bearer(created["key"])).status_code == 403
    assert client.delete(f"/admin/api-keys/{created['id']}", headers=admin_headers).status_code == 204
    refused = client.get("/admin/tenants", headers=_bearer(created["key"]))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "api_key_revoked"
    # Revoking again keeps the first time and still succeeds.
    listed = client.get(f"/admin/tenants/{tenant['id']}/api-keys", headers=admin_headers).json()["data"]
    first = listed[0]["revoked_at"]
    assert first is not None
    assert client.delete(f"/admin/api-keys/{created['id']}", headers=admin_headers).status_code == 204
    again = client.get(f"/admin/tenants/{tenant['id']}/api-keys", headers=admin_headers).json()["data"]
    assert again[0]["revoked_at"] == first


def test_revocation_reaches_another_process_within_5s(
    build_app, admin_headers, make_tenant, make_key, client
):
    """A second app (another worker) has the key cached; revocation through the first must reach it."""
    from litestar.testing import TestClient

    tenant = make_tenant()
    key = make_key(tenant["id"], scopes=("billing",))
    other = build_app(key_cache_ttl_seconds=1.0)
    with TestClient(other) as other_client:
        assert other_client.get("/admin/tenants", headers=_bearer(key)).status_code == 403
        key_id = client.get(f"/admin/tenants/{tenant['id']}/api-keys", headers=admin_headers).json()["data"][
            0
        ]["id"]
        assert client.delete(f"/admin/api-keys/{key_id}", headers=admin_headers).status_code == 204
        start = time.monotonic()
        status = 403
        while time.monotonic() - start < 5.0:
            status = other_client.get("/admin/tenants", headers=_bearer(key)).status_code
            if status == 401:
                break
            time.sleep(0.2)
        assert status == 401
        assert time.monotonic() - start <= 5.0


def test_expired_key_is_401(client, admin_headers, make_tenant, migrated_database_url):
    tenant = make_tenant()
    expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    created = client.post(
        f"/admin/tenants/{tenant['id']}/api-keys", json={"expires_at": expires}, headers=admin_headers
    )
    assert created.status_code == 201, created.text
    assert created.json()["expires_at"] is not None
    key = created.json()["key"]
    assert client.get("/admin/tenants", headers=_bearer(key)).status_code == 403
    # Move the expiry into the past behind the app's back and drop the cached row so it is read again
    # (expiry of a cached row is covered in tests/unit/test_auth_cache.py).
    asyncio.run(
        _fetch(
            migrated_database_url,
            "UPDATE api_keys SET expires_at = now() - interval '1 second' RETURNING id",
        )
    )
    client.app.state.authenticator.forget_key(uuid.UUID(created.json()["id"]))
    refused = client.get("/admin/tenants", headers=_bearer(key))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "api_key_expired"


def test_last_used_is_written_in_batches(client, admin_headers, make_tenant, make_key, migrated_database_url):
    key = make_key(make_tenant()["id"])
    for _ in range(3):
        assert client.get("/admin/tenants", headers=_bearer(key)).status_code == 403
    # Nothing written per request...
    rows = asyncio.run(_fetch(migrated_database_url, "SELECT last_used_at FROM api_keys"))
    assert rows[0]["last_used_at"] is None
    # ...one batched write when the flusher runs (in the app's own event loop, the client's portal).
    flush = client.app.state.authenticator.flush_last_used
    assert client.blocking_portal.call(flush) == 1
    rows = asyncio.run(_fetch(migrated_database_url, "SELECT last_used_at FROM api_keys"))
    assert rows[0]["last_used_at"] is not None
    assert client.blocking_portal.call(flush) == 0


def test_last_used_is_flushed_when_the_app_stops(build_app, admin_headers, migrated_database_url):
    from litestar.testing import TestClient

    app = build_app(last_used_flush_seconds=3600.0)
    with TestClient(app) as client:
        tenant = client.post("/admin/tenants", json={"name": "stopping"}, headers=admin_headers).json()
        key = client.post(f"/admin/tenants/{tenant['id']}/api-keys", json={}, headers=admin_headers).json()[
            "key"
        ]
        assert client.get("/admin/tenants", headers=_bearer(key)).status_code == 403
    rows = asyncio.run(_fetch(migrated_database_url, "SELECT last_used_at FROM api_keys"))
    assert rows[0]["last_used_at"] is not None
