"""/admin/tenants: create, list, get, patch. Admin keys only."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import require_admin
from app.auth.middleware import AUTHENTICATOR_STATE_KEY
from app.domain.strict import strict_body
from app.domain.tenants.schemas import Status, TenantCreate, TenantList, TenantOut, TenantUpdate
from app.domain.tenants.service import TenantService, to_out

DbSession = NamedDependency[AsyncSession]


class TenantController(Controller):
    path = "/admin/tenants"
    guards = (require_admin,)
    tags = ("admin: tenants",)

    @post("/", operation_id="createTenant", summary="Create a tenant")
    async def create_tenant(
        self, request: Request[Any, Any, Any], db_session: DbSession, data: JSONBody[TenantCreate]
    ) -> TenantOut:
        data = await strict_body(request, TenantCreate)
        tenant = await TenantService(db_session).create(data)
        # Commit here, not after the response started: a failed commit must not be reported as 201.
        await db_session.commit()
        return to_out(tenant)

    @get("/", operation_id="listTenants", summary="List tenants, oldest first")
    async def list_tenants(
        self,
        db_session: DbSession,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        offset: Annotated[int, QueryParameter(ge=0, le=1_000_000_000)] = 0,
        status: Annotated[Status | None, QueryParameter(description="only tenants with this status")] = None,
    ) -> TenantList:
        tenants, total = await TenantService(db_session).list(limit, offset, status)
        return TenantList(data=[to_out(t) for t in tenants], total=total)

    @get("/{tenant_id:uuid}", operation_id="getTenant", summary="Get a tenant")
    async def get_tenant(self, db_session: DbSession, tenant_id: FromPath[UUID]) -> TenantOut:
        return to_out(await TenantService(db_session).get(tenant_id))

    @patch(
        "/{tenant_id:uuid}", operation_id="updateTenant", summary="Change a tenant's name, limits or status"
    )
    async def update_tenant(
        self,
        request: Request[Any, Any, Any],
        db_session: DbSession,
        tenant_id: FromPath[UUID],
        data: JSONBody[TenantUpdate],
    ) -> TenantOut:
        data = await strict_body(request, TenantUpdate)
        tenant = await TenantService(db_session).update(tenant_id, data)
        await db_session.commit()
        # Suspension must bite at once in this process; other processes follow within the cache TTL.
        request.app.state[AUTHENTICATOR_STATE_KEY].forget_tenant(tenant_id)
        return to_out(tenant)
