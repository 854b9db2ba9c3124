"""The embedded default (SQLite) runs the same admin API: keys, expiry, revocation, suspension."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from litestar.testing import TestClient

from app.db.migrate import upgrade


def test_admin_api_on_sqlite(build_app, admin_headers, tmp_path):
    db_file = tmp_path / "embedded.db"
    url = f"sqlite+aiosqlite:///{db_file}"
    upgrade(url)
    with TestClient(build_app(database_url=url)) as client:
        tenant = client.post(
            "/admin/tenants", json={"name": "lite", "monthly_token_quota": 10**12}, headers=admin_headers
        )
        assert tenant.status_code == 201, tenant.text
        tid = tenant.json()["id"]
        assert client.post("/admin/tenants", json={"name": "lite"}, headers=admin_headers).status_code == 409
        expires = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        created = client.post(
            f"/admin/tenants/{tid}/api-keys",
            json={"scopes": ["billing"], "expires_at": expires},
            headers=admin_headers,
        ).json()
        bearer = {"Authorization": f"Bearer {created['key']}"}
        assert client.get("/admin/tenants", headers=bearer).status_code == 403
        listed = client.get(f"/admin/tenants/{tid}/api-keys", headers=admin_headers).json()["data"]
        assert listed[0]["scopes"] == ["billing"] and listed[0]["expires_at"].startswith(expires[:16])
        client.patch(f"/admin/tenants/{tid}", json={"status": "suspended"}, headers=admin_headers)
        assert client.get("/admin/tenants", headers=bearer).json()["error"]["code"] == "tenant_suspended"
        assert client.delete(f"/admin/api-keys/{created['id']}", headers=admin_headers).status_code == 204
        assert client.get("/admin/tenants", headers=bearer).status_code == 401
        assert client.get("/ready").status_code in (200, 503)
        assert client.get("/ready").json()["checks"]["database"] == "ok"
    # The database with its WAL side files, whatever SQLite left where.
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("embedded.db*"))
    assert created["prefix"].encode() in raw  # the scan sees the rows: the public prefix is stored
    assert created["key"].encode() not in raw
    assert created["key"][12:].encode() not in raw
