"""Schemathesis over the admin routes of the foundation, in process: generated requests (valid and not)
never get a 5xx, and every response matches the schema, errors included (the envelope)."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

EXAMPLES_PER_OPERATION = 8
MINE = {
    "createTenant",
    "listTenants",
    "getTenant",
    "updateTenant",
    "createApiKey",
    "listApiKeys",
    "revokeApiKey",
}


def test_admin_routes_never_5xx_and_match_the_schema(client, admin_headers, make_tenant):
    tenant = make_tenant(name="fuzz-target")
    schema = schemathesis.openapi.from_dict(client.get("/schema/openapi.json").json())
    operations = [r.ok() for r in schema.get_all_operations()]
    mine = [op for op in operations if op.definition.raw.get("operationId") in MINE]
    assert len(mine) == len(MINE)
    failures: list[str] = []
    statuses: set[int] = set()
    for operation in mine:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: Any) -> None:
            # Half of the generated ids hit a real tenant, so the deeper paths are reached too.
            if case.path_parameters and "tenant_id" in case.path_parameters and hash(str(case.body)) % 2:
                case.path_parameters["tenant_id"] = tenant["id"]
            kwargs = case.as_transport_kwargs(base_url="")
            response = client.request(
                kwargs["method"],
                kwargs["url"],
                headers={**(kwargs.get("headers") or {}), **admin_headers},
                params=kwargs.get("params"),
                content=kwargs.get("content"),
                json=kwargs.get("json"),
            )
            statuses.add(response.status_code)
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

        try:
            check()
        except Exception as exc:
            failures.append(f"{operation.label}: {str(exc)[:600]}")
    assert not failures, "\n\n".join(failures)
    # A positive control: the generator reached both the success and the refusal paths.
    assert {200, 422} <= statuses, statuses
