"""Who is calling: an admin, or a tenant key with scopes. Handlers get it as the `principal` dependency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID

from app.limits.types import TenantLimits

SCOPES = ("completions", "billing")


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["admin", "tenant"]
    tenant_id: UUID | None
    key_id: UUID | None  # None for the bootstrap LORAPLEX_ADMIN_KEY, which has no row
    scopes: frozenset[str]
    # The tenant's limits as read with the key (as fresh as the key cache, seconds), so a completion
    # needs no database session of its own to find them.
    limits: TenantLimits | None = field(default=None, compare=False)

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    def has_scope(self, scope: str) -> bool:
        # Admin keys carry no tenant scopes: an admin cannot call /v1 as some tenant.
        return scope in self.scopes
