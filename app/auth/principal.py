"""Who is calling: an admin, or a tenant key with scopes. Handlers get it as the `principal` dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from uuid import UUID

SCOPES = ("completions", "billing")


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["admin", "tenant"]
    tenant_id: UUID | None
    key_id: UUID | None  # None for the bootstrap LORAPLEX_ADMIN_KEY, which has no row
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    def has_scope(self, scope: str) -> bool:
        # Admin keys carry no tenant scopes: an admin cannot call /v1 as some tenant.
        return scope in self.scopes
