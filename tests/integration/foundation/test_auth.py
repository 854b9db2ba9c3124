"""Who may call what: every 401 and 403 of the key scheme, tried against the real database."""

from __future__ import annotations

import pytest

from app.auth.keys import generate_key
from tests.integration.conftest import TEST_ADMIN_KEY


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


MISSING = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer   "},
    {"Authorization": f"Basic {TEST_ADMIN_KEY}"},
    {"Authorization": TEST_ADMIN_KEY},
    {"X-API-Key": TEST_ADMIN_KEY},
]
UNKNOWN = [
    generate_key(),  # well-formed, never issued
    "lpx_short",
    TEST_ADMIN_KEY + "x",
    TEST_ADMIN_KEY[:-1],
    TEST_ADMIN_KEY.upper(),
    "lpx_" + "0" * 43,
    "' OR 1=1 --",
    "lpx_%00" + "a" * 40,
    "lpx_" + "a" * 10_000,
]


def test_missing_key_is_401(client):
    for headers in MISSING:
        response = client.get("/admin/tenants", headers=headers)
        assert response.status_code == 401, headers
        error = response.json()["error"]
        assert error["type"] == "authentication_error"
        assert error["code"] == "missing_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_key_is_401(client):
    for key in UNKNOWN:
        response = client.get("/admin/tenants", headers=_bearer(key))
        assert response.status_code == 401, key
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_key_with_right_prefix_but_wrong_secret_is_401(client, make_tenant, make_key):
    key = make_key(make_tenant()["id"])
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert forged[:12] == key[:12]
    response = client.get("/admin/tenants", headers=_bearer(forged))
    assert response.status_code == 401


@pytest.mark.parametrize("scopes", [("completions",), ("billing",), ("completions", "billing")])
def test_tenant_keys_are_refused_on_admin_routes_with_403(client, make_tenant, make_key, scopes):
    tenant = make_tenant()
    key = make_key(tenant["id"], scopes=scopes)
    for method, path, body in [
        ("get", "/admin/tenants", None),
        ("post", "/admin/tenants", {"name": "sneaky"}),
        ("get", f"/admin/tenants/{tenant['id']}", None),
        ("patch", f"/admin/tenants/{tenant['id']}", {"status": "active"}),
        ("post", f"/admin/tenants/{tenant['id']}/api-keys", {"scopes": ["completions"]}),
        ("get", f"/admin/tenants/{tenant['id']}/api-keys", None),
    ]:
        kwargs = {"json": body} if body is not None else {}
        response = getattr(client, method)(path, headers=_bearer(key), **kwargs)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["code"] == "admin_required"


def test_a_tenant_key_cannot_create_keys_or_tenants(client, admin_headers, make_tenant, make_key):
    tenant = make_tenant()
    key = make_key(tenant["id"])
    client.post("/admin/tenants", json={"name": "sneaky"}, headers=_bearer(key))
    names = [t["name"] for t in client.get("/admin/tenants", headers=admin_headers).json()["data"]]
    assert "sneaky" not in names
    keys = client.get(f"/admin/tenants/{tenant['id']}/api-keys", headers=admin_headers).json()["data"]
    assert len(keys) == 1


def test_suspended_tenant_keys_get_403_and_work_again_when_active(
    client, admin_headers, make_tenant, make_key
):
    tenant = make_tenant()
    key = make_key(tenant["id"], scopes=("billing",))
    assert client.get("/admin/tenants", headers=_bearer(key)).json()["error"]["code"] == "admin_required"
    suspend = client.patch(
        f"/admin/tenants/{tenant['id']}", json={"status": "suspended"}, headers=admin_headers
    )
    assert suspend.status_code == 200
    refused = client.get("/admin/tenants", headers=_bearer(key))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "tenant_suspended"
    client.patch(f"/admin/tenants/{tenant['id']}", json={"status": "active"}, headers=admin_headers)
    assert client.get("/admin/tenants", headers=_bearer(key)).json()["error"]["code"] == "admin_required"


def test_admin_keys_from_the_database_work_and_can_be_revoked(client, app_settings):
    from app.bootstrap import create_admin_key

    created = create_admin_key(app_settings, name="ops")
    assert created.kind == "admin"
    assert client.get("/admin/tenants", headers=_bearer(created.key)).status_code == 200
    # One admin may revoke another.
    revoked = client.delete(f"/admin/api-keys/{created.id}", headers=_bearer(TEST_ADMIN_KEY))
    assert revoked.status_code == 204
    assert client.get("/admin/tenants", headers=_bearer(created.key)).status_code == 401


def test_open_routes_need_no_key(client):
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    assert client.get("/schema/openapi.json").status_code == 200


def test_scopes_on_the_real_routes(client, admin_headers, make_tenant, make_key):
    """The guards as wired in the app: a billing key cannot call /v1, a completions key cannot read billing,
    an admin key cannot call /v1 as some tenant."""
    tenant = make_tenant()
    billing = _bearer(make_key(tenant["id"], scopes=("billing",)))
    completions = _bearer(make_key(tenant["id"], scopes=("completions",)))
    for headers in (billing, admin_headers):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "insufficient_scope"
        response = client.post("/v1/completions", json={"model": "x", "prompt": "hi"}, headers=headers)
        assert response.status_code == 403
    response = client.get("/admin/usage", headers=completions)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"
    assert client.get("/admin/usage", headers=billing).status_code != 403
    assert client.get("/admin/usage", headers=admin_headers).status_code != 403
