"""adapters

Revision ID: 0002_adapters
Revises: 0001_tenants_keys
Create Date: 2026-11-27 17:00:07.140815+00:00
"""

from __future__ import annotations

import advanced_alchemy.types
import sqlalchemy as sa
from alembic import op

revision = "0002_adapters"
down_revision = "0001_tenants_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", advanced_alchemy.types.GUID(length=16), nullable=False),
        sa.Column("tenant_id", advanced_alchemy.types.GUID(length=16), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("use_rslora", sa.Boolean(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("config_sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("sa_orm_sentinel", sa.Integer(), nullable=True),
        sa.Column("created_at", advanced_alchemy.types.DateTimeUTC(timezone=True), nullable=False),
        sa.Column("updated_at", advanced_alchemy.types.DateTimeUTC(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status != 'ready' OR version IS NOT NULL", name=op.f("ck_adapters_ready_has_version")
        ),
        sa.CheckConstraint("status IN ('pending', 'ready', 'failed')", name=op.f("ck_adapters_status_valid")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_adapters_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_adapters_tenant_idempotency_key"),
        sa.UniqueConstraint("tenant_id", "name", "version", name="uq_adapters_tenant_name_version"),
    )
    op.create_index(op.f("ix_adapters_sha256"), "adapters", ["sha256"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_adapters_sha256"), table_name="adapters")
    op.drop_table("adapters")
