"""Tenant rules: unique names, limits, status. Controllers stay thin; guards decide who may call."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import msgspec
from advanced_alchemy.filters import LimitOffset, OrderBy
from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain.tenants.models import Tenant
from app.domain.tenants.schemas import TenantCreate, TenantOut, TenantUpdate
from app.errors import conflict, not_found


class TenantRepository(SQLAlchemyAsyncRepository[Tenant]):
    model_type = Tenant


def to_out(tenant: Tenant) -> TenantOut:
    return TenantOut(
        id=tenant.id,
        name=tenant.name,
        status=tenant.status,  # type: ignore[arg-type]
        requests_per_minute=tenant.requests_per_minute,
        tokens_per_minute=tenant.tokens_per_minute,
        max_concurrent_requests=tenant.max_concurrent_requests,
        monthly_token_quota=tenant.monthly_token_quota,
        created_at=tenant.created_at,
        updated_at=tenant.updated_at,
    )


class TenantService:
    def __init__(self, session: AsyncSession) -> None:
        self.repo = TenantRepository(session=session)

    async def get(self, tenant_id: UUID) -> Tenant:
        tenant = await self.repo.get_one_or_none(id=tenant_id)
        if tenant is None:
            raise not_found("Tenant", param="tenant_id")
        return tenant

    async def _ensure_name_free(self, name: str) -> None:
        if await self.repo.exists(name=name):
            raise conflict(f"A tenant named '{name}' already exists", param="name")

    async def create(self, data: TenantCreate) -> Tenant:
        await self._ensure_name_free(data.name)
        tenant = Tenant(status="active", **msgspec.structs.asdict(data))
        return await self.repo.add(tenant)

    async def list(self, limit: int, offset: int, status: str | None = None) -> tuple[list[Tenant], int]:
        filters: list[Any] = [
            LimitOffset(limit=limit, offset=offset),
            OrderBy(field_name="created_at", sort_order="asc"),
        ]
        if status is not None:
            filters.append(Tenant.status == status)
        return await self.repo.get_many_and_count(*filters)

    async def update(self, tenant_id: UUID, data: TenantUpdate) -> Tenant:
        tenant = await self.get(tenant_id)
        changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not msgspec.UNSET}
        if "name" in changes and changes["name"] != tenant.name:
            await self._ensure_name_free(changes["name"])
        for field, value in changes.items():
            setattr(tenant, field, value)
        return await self.repo.update(tenant)
