"""Request and response bodies of the API-key routes. The key itself appears only in `KeyCreated`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import msgspec

from app.domain.names import Name

Scope = Literal["completions", "billing"]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True, description="ISO 8601 with a time zone")]


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name | None = None
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=2)] = msgspec.field(
        default_factory=lambda: ["completions"]
    )
    expires_at: AwareDatetime | None = None


class KeyOut(msgspec.Struct):
    id: UUID
    tenant_id: UUID | None
    kind: str
    name: str | None
    scopes: list[str]
    prefix: str
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime


class KeyCreated(msgspec.Struct):
    """The new key; `key` is shown this once and cannot be read again."""

    id: UUID
    tenant_id: UUID | None
    kind: str
    name: str | None
    scopes: list[str]
    prefix: str
    key: str
    expires_at: datetime | None
    created_at: datetime


class KeyList(msgspec.Struct):
    data: list[KeyOut]
    object: str = "list"
