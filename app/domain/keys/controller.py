"""Tenant API keys: create (shown once), list (never the secret), revoke. Admin keys only."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import require_admin
from app.auth.middleware import AUTHENTICATOR_STATE_KEY
from app.config import Settings
from app.domain.keys.schemas import KeyCreate, KeyCreated, KeyList
from app.domain.keys.service import ApiKeyService
from app.domain.strict import strict_body
from app.domain.tenants.service import TenantService

DbSession = NamedDependency[AsyncSession]


def _keys(db_session: AsyncSession, settings: Settings) -> ApiKeyService:
    assert settings.secret is not None, "create_app resolves the secret"
    return ApiKeyService(db_session, settings.secret)


class ApiKeyController(Controller):
    path = "/admin"
    guards = (require_admin,)
    tags = ("admin: api keys",)

    @post(
        "/tenants/{tenant_id:uuid}/api-keys",
        operation_id="createApiKey",
        summary="Issue a key for a tenant; the key is in this response only",
    )
    async def create_key(
        self,
        request: Request[Any, Any, Any],
        db_session: DbSession,
        settings: NamedDependency[Settings],
        tenant_id: FromPath[UUID],
        data: JSONBody[KeyCreate],
    ) -> KeyCreated:
        data = await strict_body(request, KeyCreate)
        await TenantService(db_session).get(tenant_id)
        created = await _keys(db_session, settings).create_tenant_key(tenant_id, data)
        # Commit before answering: a key shown to the client must exist.
        await db_session.commit()
        return created

    @get(
        "/tenants/{tenant_id:uuid}/api-keys",
        operation_id="listApiKeys",
        summary="List a tenant's keys, without their secrets",
    )
    async def list_keys(
        self, db_session: DbSession, settings: NamedDependency[Settings], tenant_id: FromPath[UUID]
    ) -> KeyList:
        await TenantService(db_session).get(tenant_id)
        return KeyList(data=await _keys(db_session, settings).list_for_tenant(tenant_id))

    @delete("/api-keys/{key_id:uuid}", operation_id="revokeApiKey", summary="Revoke a key (idempotent)")
    async def revoke_key(
        self,
        request: Request[Any, Any, Any],
        db_session: DbSession,
        settings: NamedDependency[Settings],
        key_id: FromPath[UUID],
    ) -> None:
        await _keys(db_session, settings).revoke(key_id)
        await db_session.commit()
        request.app.state[AUTHENTICATOR_STATE_KEY].forget_key(key_id)
