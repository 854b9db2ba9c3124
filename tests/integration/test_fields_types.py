"""Numbers and booleans sent as strings are a 400 `invalid_type` naming the field, as OpenAI answers,
never a silent conversion (Litestar alone would turn "5" into 5); the admin API refuses them with its 422."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import TestClient

COMPLETION = {"model": "m", "prompt": "x"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.fixture
def tenant_headers(make_tenant: Any, make_key: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(make_tenant()['id'])}"}


@pytest.mark.parametrize(
    ("path", "base", "field", "value", "words"),
    [
        ("/v1/completions", COMPLETION, "max_tokens", "5", "expected an integer or null, but got a string"),
        ("/v1/completions", COMPLETION, "n", "2", "expected an integer, but got a string"),
        ("/v1/completions", COMPLETION, "seed", "1", "expected an integer or null, but got a string"),
        ("/v1/completions", COMPLETION, "logprobs", "2", "expected an integer or null"),
        ("/v1/completions", COMPLETION, "temperature", "0.5", "expected a number or null, but got a string"),
        ("/v1/completions", COMPLETION, "top_p", "1", "expected a number or null"),
        ("/v1/completions", COMPLETION, "stream", "true", "expected a boolean, but got a string"),
        ("/v1/completions", COMPLETION, "echo", "false", "expected a boolean, but got a string"),
        ("/v1/completions", COMPLETION, "max_tokens", 5.0, "expected an integer or null, but got a number"),
        ("/v1/chat/completions", CHAT, "max_completion_tokens", "5", "expected an integer or null"),
        ("/v1/chat/completions", CHAT, "top_logprobs", "3", "expected an integer or null"),
        ("/v1/chat/completions", CHAT, "frequency_penalty", "0.1", "expected a number or null"),
        ("/v1/chat/completions", CHAT, "logprobs", "true", "expected a boolean, but got a string"),
        ("/v1/chat/completions", CHAT, "stop_token_ids", ["7"], "expected an integer, but got a string"),
    ],
)
def test_v1_strings_for_numbers_and_booleans_are_invalid_type(
    client: TestClient,  # type: ignore[type-arg]
    tenant_headers: dict[str, str],
    path: str,
    base: dict[str, Any],
    field: str,
    value: Any,
    words: str,
) -> None:
    r = client.post(path, json={**base, field: value}, headers=tenant_headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    param = f"{field}[0]" if isinstance(value, list) else field
    assert (error["param"], error["code"], error["type"]) == (param, "invalid_type", "invalid_request_error")
    assert words in error["message"] and f"'{param}'" in error["message"]


def test_v1_nested_string_number_names_the_path(
    client: TestClient,  # type: ignore[type-arg]
    tenant_headers: dict[str, str],
) -> None:
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": "1"}}
    r = client.post("/v1/completions", json=body, headers=tenant_headers)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "stream_options.include_usage"


def test_v1_right_types_still_pass_validation(
    client: TestClient,  # type: ignore[type-arg]
    tenant_headers: dict[str, str],
) -> None:
    # An int where a number belongs is fine (JSON has one number type); this app has no model, so a
    # body that passes validation gets the 503 of a missing engine, not a 400.
    body = {**COMPLETION, "max_tokens": 5, "n": 1, "seed": 1, "temperature": 1, "stream": False}
    r = client.post("/v1/completions", json=body, headers=tenant_headers)
    assert r.status_code == 503, r.text


@pytest.mark.parametrize(
    ("field", "value"),
    [("requests_per_minute", "60"), ("tokens_per_minute", "1000"), ("monthly_token_quota", 1.5)],
)
def test_admin_tenant_update_refuses_strings_for_numbers(
    client: TestClient,  # type: ignore[type-arg]
    admin_headers: dict[str, str],
    make_tenant: Any,
    field: str,
    value: Any,
) -> None:
    tenant = make_tenant()
    r = client.patch(f"/admin/tenants/{tenant['id']}", json={field: value}, headers=admin_headers)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field
    assert client.get(f"/admin/tenants/{tenant['id']}", headers=admin_headers).json()[field] is None
