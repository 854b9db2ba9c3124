"""Guards decide on the Principal alone: each one tried with every kind of caller."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from app.auth import Principal, require_admin, require_billing, require_scope, require_tenant
from app.errors import ApiError

TENANT = uuid.uuid4()
CALLERS = {
    "admin": Principal(kind="admin", tenant_id=None, key_id=None, scopes=frozenset()),
    "completions": Principal(
        kind="tenant", tenant_id=TENANT, key_id=uuid.uuid4(), scopes=frozenset({"completions"})
    ),
    "billing": Principal(kind="tenant", tenant_id=TENANT, key_id=uuid.uuid4(), scopes=frozenset({"billing"})),
    "both": Principal(
        kind="tenant", tenant_id=TENANT, key_id=uuid.uuid4(), scopes=frozenset({"completions", "billing"})
    ),
    "none": Principal(kind="tenant", tenant_id=TENANT, key_id=uuid.uuid4(), scopes=frozenset()),
}
ALLOWED = {
    "require_admin": {"admin"},
    "require_tenant": {"completions", "billing", "both", "none"},
    "require_scope(completions)": {"completions", "both"},
    "require_billing": {"admin", "billing", "both"},
}
GUARDS = {
    "require_admin": require_admin,
    "require_tenant": require_tenant,
    "require_scope(completions)": require_scope("completions"),
    "require_billing": require_billing,
}


def _connection(user: object) -> SimpleNamespace:
    return SimpleNamespace(scope={"user": user})


@pytest.mark.parametrize("guard_name", list(GUARDS))
def test_guard_matrix(guard_name):
    guard = GUARDS[guard_name]
    for caller, principal in CALLERS.items():
        try:
            guard(_connection(principal), None)  # type: ignore[arg-type]
            allowed = True
        except ApiError as err:
            assert err.status_code == 403
            allowed = False
        assert allowed == (caller in ALLOWED[guard_name]), (guard_name, caller)


@pytest.mark.parametrize("guard_name", list(GUARDS))
def test_no_principal_is_401_not_a_pass(guard_name):
    for user in [None, "admin", {"kind": "admin"}]:
        with pytest.raises(ApiError) as err:
            GUARDS[guard_name](_connection(user), None)  # type: ignore[arg-type]
        assert err.value.status_code == 401
