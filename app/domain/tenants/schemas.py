"""Request and response bodies of /admin/tenants."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import msgspec

from app.domain.names import Name

PerMinute = Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]
Concurrency = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Quota = Annotated[int, msgspec.Meta(ge=1, le=10**15)]
Status = Literal["active", "suspended"]


class TenantCreate(msgspec.Struct, forbid_unknown_fields=True):
    """A new tenant; a limit left out (or null) means no limit."""

    name: Name
    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None
    max_concurrent_requests: Concurrency | None = None
    monthly_token_quota: Quota | None = None


class TenantUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """Fields to change; left out = unchanged, null = remove that limit."""

    name: Name | msgspec.UnsetType = msgspec.UNSET
    status: Status | msgspec.UnsetType = msgspec.UNSET
    requests_per_minute: PerMinute | msgspec.UnsetType | None = msgspec.UNSET
    tokens_per_minute: PerMinute | msgspec.UnsetType | None = msgspec.UNSET
    max_concurrent_requests: Concurrency | msgspec.UnsetType | None = msgspec.UNSET
    monthly_token_quota: Quota | msgspec.UnsetType | None = msgspec.UNSET


class TenantOut(msgspec.Struct):
    id: UUID
    name: str
    status: Status
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent_requests: int | None
    monthly_token_quota: int | None
    created_at: datetime
    updated_at: datetime


class TenantList(msgspec.Struct):
    data: list[TenantOut]
    total: int
    object: str = "list"
