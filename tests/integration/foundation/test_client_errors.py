"""Errors say what the client needs, never our internals (issue 13): /v1 bodies name the missing, mistyped
or out-of-range field; /admin/usage refuses a bad tenant id with the documented 400; the CSV bill's
content type names its charset once; 503s, /ready and oversized bodies carry stable words only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from litestar.testing import TestClient

from app.domain.completions.serving import serving_of
from app.drain import drain_of


@pytest.fixture
def tenant_headers(make_tenant: Any, make_key: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(make_tenant()['id'])}"}


@pytest.mark.parametrize(
    ("path", "body", "param", "code", "words"),
    [
        ("/v1/completions", {"prompt": "hi"}, "model", "missing_required_parameter", "Missing required"),
        ("/v1/chat/completions", {"model": "m"}, "messages", "missing_required_parameter", "Missing"),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"content": "hi"}]},
            "messages[0].role",
            "missing_required_parameter",
            "Missing required parameter: 'messages[0].role'",
        ),
        ("/v1/completions", {"model": 1, "prompt": "x"}, "model", "invalid_type", "expected a string"),
        (
            "/v1/completions",
            {"model": "m", "prompt": "x", "temperature": "hot"},
            "temperature",
            "invalid_type",
            "expected a number or null, but got a string",
        ),
        (
            "/v1/completions",
            {"model": "m", "prompt": "x", "max_tokens": 0},
            "max_tokens",
            "invalid_value",
            "expected an integer >= 1",
        ),
        (
            "/v1/completions",
            {"model": "m", "prompt": "x", "temperature": 5},
            "temperature",
            "invalid_value",
            "expected a number <= 2.0",
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "invalid_value",
            "Invalid value for 'messages[0].role'",
        ),
        (
            "/v1/completions",
            {"model": "m", "prompt": "x", "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
            "invalid_type",
            "expected a boolean",
        ),
    ],
)
def test_v1_body_errors_name_the_field_and_the_problem(
    client: TestClient[Any],
    tenant_headers: dict[str, str],
    path: str,
    body: dict[str, Any],
    param: str,
    code: str,
    words: str,
) -> None:
    r = client.post(path, json=body, headers=tenant_headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert words in error["message"]
    assert "`" not in error["message"] and "JSON object" not in error["message"]


def test_a_body_that_is_not_an_object_says_so(
    client: TestClient[Any], tenant_headers: dict[str, str]
) -> None:
    r = client.post("/v1/completions", json=["model", "prompt"], headers=tenant_headers)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "The request body must be a JSON object, got an array.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_json",
    }


def test_a_body_over_the_limit_is_refused_before_it_is_read(
    client: TestClient[Any], tenant_headers: dict[str, str]
) -> None:
    limit = client.app.state.settings.max_request_bytes
    body = b'{"model": "m", "prompt": "' + b"x" * limit + b'"}'
    r = client.post(
        "/v1/completions", content=body, headers={**tenant_headers, "content-type": "application/json"}
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_an_unavailable_engine_is_a_503_without_its_reason(
    client: TestClient[Any], tenant_headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # This app has no model: the engine client's reason names a setting, which is the operator's business.
    r = client.post("/v1/completions", json={"model": "m", "prompt": "hi"}, headers=tenant_headers)
    assert r.status_code == 503
    assert r.json()["error"] == {
        "message": "The model is not available right now; try again later.",
        "type": "service_unavailable_error",
        "param": None,
        "code": "engine_unavailable",
    }
    assert int(r.headers["retry-after"]) > 0
    assert "LORAPLEX_MODEL" in caplog.text  # the reason went to the log instead


def test_ready_names_the_failing_part_but_not_the_exception(
    client: TestClient[Any], monkeypatch: Any
) -> None:
    serving = serving_of(client.app)
    monkeypatch.setattr(serving, "settings", dataclasses.replace(serving.settings, model="some-model"))
    fault = "engine dead: ValueError: Overflow when unpacking long long"
    monkeypatch.setattr(serving.engine, "readiness", lambda: (False, fault))
    r = client.get("/ready")
    assert r.status_code == 503
    assert r.json()["checks"]["engine"] == "engine dead"
    assert "Overflow" not in r.text and "ValueError" not in r.text


def test_ready_and_new_requests_are_503_while_draining(
    client: TestClient[Any], tenant_headers: dict[str, str]
) -> None:
    drain_of(client.app).begin()
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["shutdown"] == "draining"
    assert client.get("/health").status_code == 200
    for method, path in (("POST", "/v1/completions"), ("GET", "/admin/tenants")):
        r = client.request(method, path, json={"model": "m", "prompt": "hi"}, headers=tenant_headers)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "shutting_down"
        assert r.headers["retry-after"] == "5" and r.headers["connection"] == "close"
        assert r.headers["x-request-id"]  # logged like every other answer


def test_admin_usage_refuses_a_bad_tenant_id_with_400(
    client: TestClient[Any], admin_headers: dict[str, str]
) -> None:
    r = client.get("/admin/usage", params={"tenant_id": "not-a-uuid"}, headers=admin_headers)
    assert r.status_code == 400
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("tenant_id", "bad_request")
    ok = client.get(
        "/admin/usage", params={"tenant_id": "00000000-0000-0000-0000-000000000000"}, headers=admin_headers
    )
    assert ok.status_code == 200 and ok.json()["data"] == []


def test_the_csv_bill_names_its_charset_once(client: TestClient[Any], admin_headers: dict[str, str]) -> None:
    r = client.get("/admin/usage", headers={**admin_headers, "Accept": "text/csv"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
