"""Response bodies of the adapter routes. The upload itself is multipart, parsed in upload.py."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import msgspec

from app.domain.adapters.models import Adapter


class AdapterOut(msgspec.Struct):
    id: UUID
    tenant_id: UUID
    name: str
    version: int
    # `name@version`: what a tenant passes as `model` to pin this version.
    ref: str
    current: bool
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    sha256: str
    size_bytes: int
    status: str
    created_at: datetime
    warnings: list[str] = msgspec.field(default_factory=list)


class AdapterList(msgspec.Struct):
    data: list[AdapterOut]
    total: int


def to_out(adapter: Adapter, *, current: bool) -> AdapterOut:
    assert adapter.version is not None, "only ready adapters are shown"
    return AdapterOut(
        id=adapter.id,
        tenant_id=adapter.tenant_id,
        name=adapter.name,
        version=adapter.version,
        ref=adapter.ref,
        current=current,
        rank=adapter.rank,
        alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        target_modules=list(adapter.target_modules),
        sha256=adapter.sha256,
        size_bytes=adapter.size_bytes,
        status=adapter.status,
        created_at=adapter.created_at,
        warnings=list(adapter.warnings or []),
    )
