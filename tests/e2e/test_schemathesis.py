"""Schemathesis over the served OpenAPI schema, against a live server with the engine running: a bounded
number of generated requests per operation; none may get a 5xx, and every response must match the schema.

/v1 operations run with a tenant key (that owns an adapter), /admin operations with the admin key.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from tests.e2e.conftest import ADMIN, LiveServer

EXAMPLES_PER_OPERATION = 8


@pytest.fixture(scope="module")
def tenant_headers(live_server: LiveServer) -> dict[str, str]:
    tenant = live_server.tenant()
    live_server.upload(tenant["id"], "attn", live_server.demo_model / "adapters" / "demo-attn")
    return {"Authorization": f"Bearer {live_server.key(tenant['id'])}"}


def _bounded(case: Any) -> None:
    """Generation length is the one thing a fuzzer makes expensive on a CPU: keep it small."""
    if not (isinstance(case.body, dict) and "completions" in case.path):
        return
    # Random model names are all 404s; point most requests at real models so the engine path is fuzzed too.
    model = case.body.get("model")
    if isinstance(model, str) and len(model) % 4 != 3:
        case.body["model"] = ("demo-model", "attn")[len(model) % 2]
    case.body["max_tokens"] = (
        min(int(case.body["max_tokens"]), 4) if _is_int(case.body.get("max_tokens")) else 4
    )
    case.body.pop("max_completion_tokens", None)
    case.body["n"] = min(int(case.body["n"]), 2) if _is_int(case.body.get("n")) else 1


def _fuzz(operation: Any, base_url: str, headers: dict[str, str], checks: list[Any]) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case: Any) -> None:
        _bounded(case)
        case.call_and_validate(base_url=base_url, headers=headers, checks=checks)

    check()


def test_no_server_errors_and_responses_match_the_schema(
    live_server: LiveServer, tenant_headers: dict[str, str]
) -> None:
    schema = schemathesis.openapi.from_url(live_server.url + "/schema/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= {op.path for op in operations}
    for operation in operations:
        headers = tenant_headers if operation.path.startswith("/v1/") else ADMIN
        checks = [not_a_server_error, response_schema_conformance]
        try:
            _fuzz(operation, live_server.url, headers, checks)
        except Exception as exc:
            failures.append(f"{operation.label}: {_summary(exc)}")
    assert not failures, "\n\n".join(failures)
    # A positive control: some generated requests were valid and reached the engine (each one billed).
    assert any(r["status"] == "ok" for r in live_server.usage_rows())


def _summary(exc: BaseException) -> str:
    """The first lines of each distinct failure (Schemathesis groups them)."""
    parts = getattr(exc, "exceptions", None) or [exc]
    return " | ".join(" ".join(str(p).split("\n")[:3]) for p in parts)[:600]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
