"""Health, readiness, request ids, structured request logs and the OpenAPI schema."""

from __future__ import annotations

import json

from litestar.testing import TestClient


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"]["database"] == "ok"


def test_ready_is_503_when_the_database_is_unreachable(build_app, admin_headers):
    app = build_app(database_url="postgresql+asyncpg://postgres@127.0.0.1:5432/lpx_does_not_exist")
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 503
        # An outage is not the client's fault nor a bug: 503, for key lookups and for queries alike.
        from app.auth.keys import generate_key

        lookup = client.get("/admin/tenants", headers={"Authorization": f"Bearer {generate_key()}"})
        assert lookup.status_code == 503, lookup.text
        query = client.get("/admin/tenants", headers=admin_headers)
        assert query.status_code == 503, query.text
        assert query.json()["error"]["code"] == "database_unavailable"
        assert lookup.json()["error"]["code"] == "database_unavailable"
        assert ready.json() == {
            "status": "not_ready",
            "checks": {**ready.json()["checks"], "database": "unreachable"},
        }


def test_request_ids(client):
    generated = client.get("/health").headers["x-request-id"]
    assert generated.startswith("req_")
    assert client.get("/health", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    # Ids that could forge log lines or headers are replaced.
    for unsafe in ["a b", "x" * 65, "line\\nbreak", "<script>"]:
        echoed = client.get("/health", headers={"x-request-id": unsafe}).headers["x-request-id"]
        assert echoed != unsafe and echoed.startswith("req_")
    # Errors carry one too.
    assert client.get("/no-such-route").headers["x-request-id"].startswith("req_")


def test_request_log_lines_are_json_with_request_and_tenant_ids(build_app, admin_headers, capsys):
    app = build_app(log_format="json")  # the handler binds to the captured stderr
    with TestClient(app) as client:
        client.get("/health")  # a probe: logged at debug level only
        tenant = client.post("/admin/tenants", json={"name": "logged"}, headers=admin_headers).json()
        key = client.post(f"/admin/tenants/{tenant['id']}/api-keys", json={}, headers=admin_headers).json()[
            "key"
        ]
        client.get("/admin/tenants", headers={"Authorization": f"Bearer {key}", "x-request-id": "trace-me"})
        client.patch(f"/admin/tenants/{tenant['id']}", json={"status": "suspended"}, headers=admin_headers)
        client.get(
            "/admin/tenants", headers={"Authorization": f"Bearer {key}", "x-request-id": "suspended-1"}
        )
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "loraplex.access"]
    assert access, lines
    traced = [line for line in access if line.get("request_id") == "trace-me"]
    assert len(traced) == 1
    assert traced[0]["tenant_id"] == tenant["id"]
    assert traced[0]["status"] == 403
    assert traced[0]["path"] == "/admin/tenants"
    refused = [line for line in access if line.get("request_id") == "suspended-1"]
    assert refused[0]["status"] == 403 and refused[0]["tenant_id"] == tenant["id"]
    assert all(line["request_id"] for line in access)
    assert not [line for line in access if line["path"] == "/health"]
    # The key never reaches the logs.
    assert key not in capsys.readouterr().err
    assert all(key not in json.dumps(line) for line in lines)


def test_openapi_has_a_unique_operation_id_on_every_route(client):
    schema = client.get("/schema/openapi.json").json()
    ids = []
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in {"get", "post", "put", "patch", "delete"}:
                assert operation.get("operationId"), f"{method.upper()} {path} has no operationId"
                ids.append(operation["operationId"])
    assert len(ids) == len(set(ids)), ids
    for expected in [
        "createTenant",
        "listTenants",
        "getTenant",
        "updateTenant",
        "createApiKey",
        "listApiKeys",
        "revokeApiKey",
        "health",
        "ready",
    ]:
        assert expected in ids
    assert "BearerAuth" in schema["components"]["securitySchemes"]


def test_openapi_documents_the_error_envelope(client):
    schema = client.get("/schema/openapi.json").json()
    assert schema["components"]["schemas"]["Error"]["required"] == ["error"]
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and "content" in response:
                    body = response["content"]["application/json"]["schema"]
                    assert "status_code" not in str(body), (
                        f"{method} {path} {status} documents Litestar's body"
                    )
            if operation.get("security") == []:
                continue
            assert "401" in operation["responses"], f"{method} {path} needs a key but documents no 401"
    create = schema["paths"]["/admin/tenants"]["post"]["responses"]
    assert create["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert schema["paths"]["/health"]["get"]["security"] == []


def test_console_access_lines_cannot_be_forged_through_the_path(build_app, capsys):
    app = build_app(log_format="console")
    with TestClient(app) as client:
        client.get("/nothing%0A12:00:00 INFO forged: admin logged in")
    err = capsys.readouterr().err
    assert not any(line.startswith("12:00:00 INFO forged") for line in err.splitlines())
    assert "/nothing\\n12:00:00 INFO forged" in err
