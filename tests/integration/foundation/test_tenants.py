"""/admin/tenants on the real PostgreSQL: create, list, get, patch, and what each refuses."""

from __future__ import annotations

import uuid


def test_create_list_get_patch(client, admin_headers):
    created = client.post(
        "/admin/tenants", json={"name": "acme", "requests_per_minute": 60}, headers=admin_headers
    )
    assert created.status_code == 201, created.text
    tenant = created.json()
    assert tenant["name"] == "acme"
    assert tenant["status"] == "active"
    assert tenant["requests_per_minute"] == 60
    assert tenant["tokens_per_minute"] is None

    listed = client.get("/admin/tenants", headers=admin_headers).json()
    assert [t["id"] for t in listed["data"]] == [tenant["id"]]
    assert listed["total"] == 1

    got = client.get(f"/admin/tenants/{tenant['id']}", headers=admin_headers)
    assert got.status_code == 200
    assert got.json() == tenant

    patched = client.patch(
        f"/admin/tenants/{tenant['id']}",
        json={"status": "suspended", "requests_per_minute": None, "tokens_per_minute": 1000},
        headers=admin_headers,
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["status"] == "suspended"
    assert body["requests_per_minute"] is None
    assert body["tokens_per_minute"] == 1000
    assert body["name"] == "acme"


def test_duplicate_name_is_409(client, admin_headers, make_tenant):
    make_tenant(name="dup")
    response = client.post("/admin/tenants", json={"name": "dup"}, headers=admin_headers)
    assert response.status_code == 409
    assert response.json()["error"]["param"] == "name"


def test_unknown_tenant_is_404(client, admin_headers):
    response = client.get(f"/admin/tenants/{uuid.uuid4()}", headers=admin_headers)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
