"""The `adapters` table: one row per uploaded version of a tenant's adapter.

A row is `pending` while its files travel to the object store, `ready` once they are stored and
verified, `failed` when storing went wrong (the orphan sweep removes its files and then the row).
Only `ready` rows are ever visible through the API. The current version of a name is simply its highest
ready version, so making a new version current is the single commit that marks it ready.
"""

from __future__ import annotations

from uuid import UUID

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import UUIDAuditBase

# The two files of an adapter, as the adapter-format contract names them (re-exported for the registry).
from engine.adapter_format import CONFIG_FILE as CONFIG_FILE
from engine.adapter_format import WEIGHTS_FILE as WEIGHTS_FILE

ADAPTER_STATUSES = ("pending", "ready", "failed")


class Adapter(UUIDAuditBase):
    __tablename__ = "adapters"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'ready', 'failed')", name="status_valid"),
        CheckConstraint("status != 'ready' OR version IS NOT NULL", name="ready_has_version"),
        # Also the index for lookups by (tenant, name). NULL versions (pending/failed rows) never collide: both PostgreSQL and SQLite treat NULLs as distinct.
        UniqueConstraint("tenant_id", "name", "version", name="uq_adapters_tenant_name_version"),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_adapters_tenant_idempotency_key"),
    )

    tenant_id: Mapped[UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(default=False)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    # sha256 of adapter_model.safetensors: the content id the engine caches under.
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    config_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def object_prefix(tenant_id: UUID | str, adapter_id: UUID | str) -> str:
    return f"adapters/{tenant_id}/{adapter_id}/"
