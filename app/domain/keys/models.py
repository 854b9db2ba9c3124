"""The `api_keys` table: a public prefix for lookup and HMAC-SHA256(secret, key); never the key."""

from __future__ import annotations

import datetime
from uuid import UUID

from sqlalchemy import JSON, CheckConstraint, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import UUIDAuditBase

KEY_KINDS = ("admin", "tenant")


class ApiKey(UUIDAuditBase):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("kind IN ('admin', 'tenant')", name="kind_valid"),
        # Tenant keys belong to a tenant; admin keys to none.
        CheckConstraint(
            "(kind = 'admin' AND tenant_id IS NULL) OR (kind = 'tenant' AND tenant_id IS NOT NULL)",
            name="owner_matches_kind",
        ),
    )

    tenant_id: Mapped[UUID | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[datetime.datetime | None]
    revoked_at: Mapped[datetime.datetime | None]
    last_used_at: Mapped[datetime.datetime | None]
