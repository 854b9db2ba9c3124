"""The `usage_records` table: one row per request that reached (or was about to reach) the engine.

A row is written as `reserved` before the engine sees the request and settled exactly once when it ends
(`ok`, `aborted`, `error`), or marked `expired` by the sweeper when the process that reserved it died.
Billing reads nothing else. Key and adapter ids are kept without foreign keys on purpose: revoking a key
or deleting an adapter must never touch the bill.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from sqlalchemy import CheckConstraint, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import UUIDAuditBase

STATUS_RESERVED = "reserved"
STATUS_EXPIRED = "expired"
SETTLED_STATUSES = ("ok", "aborted", "error")
# Tokens are billed for requests that produced what the client asked for, or until it went away;
# a request that failed on our side (error) or died with its process (expired) costs nothing.
BILLED_STATUSES = ("ok", "aborted")
USAGE_STATUSES = (STATUS_RESERVED, *SETTLED_STATUSES, STATUS_EXPIRED)


class UsageRecord(UUIDAuditBase):
    __tablename__ = "usage_records"
    __table_args__ = (
        CheckConstraint(
            "status IN ('reserved', 'ok', 'aborted', 'error', 'expired')",
            name="status_valid",
        ),
        CheckConstraint(
            "prompt_tokens >= 0 AND cached_tokens >= 0 AND completion_tokens >= 0",
            name="tokens_not_negative",
        ),
        Index("ix_usage_records_tenant_created", "tenant_id", "created_at"),
        Index("ix_usage_records_status_created", "status", "created_at"),
        Index("ix_usage_records_created", "created_at"),  # billing across all tenants by date range
    )

    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[UUID] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    key_id: Mapped[UUID | None]
    adapter_id: Mapped[UUID | None]
    adapter_version: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=STATUS_RESERVED)
    # Prompt + max_tokens held against the monthly quota while the request runs.
    reserved_tokens: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    queue_time_s: Mapped[float | None] = mapped_column(Float)
    ttft_s: Mapped[float | None] = mapped_column(Float)
    latency_s: Mapped[float | None] = mapped_column(Float)
    settled_at: Mapped[datetime | None]
