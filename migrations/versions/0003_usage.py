"""usage

Revision ID: 0003_usage
Revises: 0002_adapters
Create Date: 2026-11-27 17:01:05.910843+00:00
"""

from __future__ import annotations

import advanced_alchemy.types
import sqlalchemy as sa
from alembic import op

revision = "0003_usage"
down_revision = "0002_adapters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("id", advanced_alchemy.types.GUID(length=16), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", advanced_alchemy.types.GUID(length=16), nullable=False),
        sa.Column("key_id", advanced_alchemy.types.GUID(length=16), nullable=True),
        sa.Column("adapter_id", advanced_alchemy.types.GUID(length=16), nullable=True),
        sa.Column("adapter_version", sa.Integer(), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reserved_tokens", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("finish_reason", sa.String(length=32), nullable=True),
        sa.Column("queue_time_s", sa.Float(), nullable=True),
        sa.Column("ttft_s", sa.Float(), nullable=True),
        sa.Column("latency_s", sa.Float(), nullable=True),
        sa.Column("settled_at", advanced_alchemy.types.DateTimeUTC(timezone=True), nullable=True),
        sa.Column("sa_orm_sentinel", sa.Integer(), nullable=True),
        sa.Column("created_at", advanced_alchemy.types.DateTimeUTC(timezone=True), nullable=False),
        sa.Column("updated_at", advanced_alchemy.types.DateTimeUTC(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('reserved', 'ok', 'aborted', 'error', 'expired')",
            name=op.f("ck_usage_records_status_valid"),
        ),
        sa.CheckConstraint(
            "prompt_tokens >= 0 AND cached_tokens >= 0 AND completion_tokens >= 0",
            name=op.f("ck_usage_records_tokens_not_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_usage_records_tenant_id_tenants"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_records")),
        sa.UniqueConstraint("request_id", name=op.f("uq_usage_records_request_id")),
    )
    op.create_index(
        "ix_usage_records_status_created", "usage_records", ["status", "created_at"], unique=False
    )
    op.create_index(
        "ix_usage_records_tenant_created", "usage_records", ["tenant_id", "created_at"], unique=False
    )
    op.create_index("ix_usage_records_created", "usage_records", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_usage_records_tenant_created", table_name="usage_records")
    op.drop_index("ix_usage_records_created", table_name="usage_records")
    op.drop_index("ix_usage_records_status_created", table_name="usage_records")
    op.drop_table("usage_records")
