"""Bad input gets the error envelope with the right status, never a 500, and nothing half-written."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg


def _count(url: str, table: str) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
        try:
            return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
        finally:
            await conn.close()

    return asyncio.run(run())


def _assert_envelope(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


BAD_TENANT_BODIES = [
    ({"name": "x" * 65}, "name"),
    ({"name": ""}, "name"),
    ({"name": "has space"}, "name"),
    ({"name": "../../etc/passwd"}, "name"),
    ({"name": "-leading-dash"}, "name"),
    ({"name": "emoji-\U0001f600"}, "name"),
    ({"name": "nul\u0000byte"}, "name"),
    ({"name": "<script>"}, "name"),
    ({"name": 123}, "name"),
    ({"name": None}, "name"),
    ({}, "name"),
    ({"name": "ok", "requests_per_minute": "60"}, "requests_per_minute"),
    ({"name": "ok", "requests_per_minute": 0}, "requests_per_minute"),
    ({"name": "ok", "requests_per_minute": -5}, "requests_per_minute"),
    ({"name": "ok", "tokens_per_minute": 1.5}, "tokens_per_minute"),
    ({"name": "ok", "max_concurrent_requests": 10**12}, "max_concurrent_requests"),
    ({"name": "ok", "monthly_token_quota": 10**30}, "monthly_token_quota"),
    ({"name": "ok", "monthly_token_quota": True}, "monthly_token_quota"),
    ({"name": "ok", "status": "suspended"}, "status"),
    ({"name": "ok", "id": str(uuid.uuid4())}, "id"),
]


def test_bad_tenant_bodies_are_422_naming_the_field(client, admin_headers, migrated_database_url):
    for body, param in BAD_TENANT_BODIES:
        response = client.post("/admin/tenants", json=body, headers=admin_headers)
        error = _assert_envelope(response, 422)
        assert error["param"] == param, (body, error)
        assert error["type"] == "invalid_request_error"
    assert _count(migrated_database_url, "tenants") == 0


def test_bad_patches_are_422_and_change_nothing(client, admin_headers, make_tenant):
    tenant = make_tenant(name="steady", requests_per_minute=10)
    url = f"/admin/tenants/{tenant['id']}"
    for body, param in [
        ({"status": "deleted"}, "status"),
        ({"status": None}, "status"),
        ({"name": None}, "name"),
        ({"name": "bad name"}, "name"),
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"requests_per_minute": 20, "unknown": 1}, "unknown"),
    ]:
        error = _assert_envelope(client.patch(url, json=body, headers=admin_headers), 422)
        assert error["param"] == param, (body, error)
    after = client.get(url, headers=admin_headers).json()
    assert after["requests_per_minute"] == 10
    assert after["name"] == "steady"
    assert after["status"] == "active"


def test_rename_onto_existing_name_is_409_and_changes_nothing(client, admin_headers, make_tenant):
    make_tenant(name="taken")
    other = make_tenant(name="mine")
    response = client.patch(
        f"/admin/tenants/{other['id']}",
        json={"name": "taken", "requests_per_minute": 5},
        headers=admin_headers,
    )
    error = _assert_envelope(response, 409)
    assert error["param"] == "name"
    after = client.get(f"/admin/tenants/{other['id']}", headers=admin_headers).json()
    assert after["name"] == "mine"
    assert after["requests_per_minute"] is None


def test_malformed_json_is_400(client, admin_headers, migrated_database_url):
    headers = {**admin_headers, "content-type": "application/json"}
    deep = b'{"name": "deep", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    for raw in [b"{", b'{"name": "a",}', b"not json", b'{"name": "a"} trailing', b"\xff\xfe", deep]:
        response = client.post("/admin/tenants", content=raw, headers=headers)
        error = _assert_envelope(response, 400)
        assert error["code"] == "invalid_json", raw
    # A JSON value of the wrong shape is a validation error, not malformed JSON.
    error = _assert_envelope(client.post("/admin/tenants", json=["a"], headers=admin_headers), 422)
    assert _count(migrated_database_url, "tenants") == 0


def test_oversize_body_is_413(client, admin_headers, app_settings, migrated_database_url):
    big = b'{"name": "' + b"a" * (app_settings.max_request_bytes + 10) + b'"}'
    headers = {**admin_headers, "content-type": "application/json"}
    error = _assert_envelope(client.post("/admin/tenants", content=big, headers=headers), 413)
    assert error["code"] == "request_too_large"

    # Chunked, with no content-length to trust: the limit holds while reading.
    def chunks():
        yield b'{"name": "'
        for _ in range(app_settings.max_request_bytes // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    _assert_envelope(client.post("/admin/tenants", content=chunks(), headers=headers), 413)
    # A lying content-length is not believed either.
    lying = {**headers, "content-length": "10"}
    response = client.post("/admin/tenants", content=big, headers=lying)
    assert response.status_code in (400, 413), response.text
    assert _count(migrated_database_url, "tenants") == 0


def test_unknown_routes_methods_and_ids(client, admin_headers):
    error = _assert_envelope(client.get("/admin/nothing-here", headers=admin_headers), 404)
    assert error["type"] == "not_found_error"
    _assert_envelope(client.get("/admin/tenants/not-a-uuid", headers=admin_headers), 404)
    _assert_envelope(client.get(f"/admin/tenants/{uuid.uuid4()}", headers=admin_headers), 404)
    _assert_envelope(client.patch(f"/admin/tenants/{uuid.uuid4()}", json={}, headers=admin_headers), 404)
    error = _assert_envelope(client.delete("/admin/tenants", headers=admin_headers), 405)
    assert error["code"] == "method_not_allowed"
    _assert_envelope(client.put("/health"), 405)


def test_bad_query_parameters_are_422(client, admin_headers):
    for query, param in [
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("offset=-1", "offset"),
        ("limit=5000", "limit"),
        ("status=deleted", "status"),
        ("status=", "status"),
        ("offset=144183205054275081895673856", "offset"),  # found by fuzzing: beyond BIGINT was a 500
    ]:
        error = _assert_envelope(client.get(f"/admin/tenants?{query}", headers=admin_headers), 422)
        assert error["param"] == param, (query, error)


def test_pagination_and_status_filter(client, admin_headers, make_tenant):
    made = [make_tenant()["id"] for _ in range(3)]
    page = client.get("/admin/tenants?limit=2&offset=1", headers=admin_headers).json()
    assert page["total"] == 3
    assert [t["id"] for t in page["data"]] == made[1:3]
    client.patch(f"/admin/tenants/{made[1]}", json={"status": "suspended"}, headers=admin_headers)
    suspended = client.get("/admin/tenants?status=suspended", headers=admin_headers).json()
    assert [t["id"] for t in suspended["data"]] == [made[1]] and suspended["total"] == 1
    active = client.get("/admin/tenants?status=active", headers=admin_headers).json()
    assert [t["id"] for t in active["data"]] == [made[0], made[2]]


def test_non_json_content_types_never_500(client, admin_headers, migrated_database_url):
    for content_type, raw in [
        ("application/x-www-form-urlencoded", b"name=form"),
        ("text/plain", b"hello"),
        (
            "multipart/form-data; boundary=x",
            b"--x\r\nContent-Disposition: form-data; name=name\r\n\r\nm\r\n--x--\r\n",
        ),
        ("application/json", b""),
    ]:
        response = client.post(
            "/admin/tenants", content=raw, headers={**admin_headers, "content-type": content_type}
        )
        assert 400 <= response.status_code < 500, (content_type, response.status_code, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert _count(migrated_database_url, "tenants") == 0


async def test_concurrent_creates_of_one_name_give_one_201_and_409s(
    async_client, admin_headers, migrated_database_url
):
    responses = await asyncio.gather(
        *[async_client.post("/admin/tenants", json={"name": "race"}, headers=admin_headers) for _ in range(6)]
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 5, [r.text for r in responses]
    assert all(
        set(r.json()["error"]) == {"message", "type", "param", "code"}
        for r in responses
        if r.status_code == 409
    )
