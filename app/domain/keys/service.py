"""Issuing, listing and revoking keys. Used by the REST routes and by `loraplex create-admin-key`."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from advanced_alchemy.filters import OrderBy
from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.keys import generate_key, hash_key, key_prefix
from app.domain.keys.models import ApiKey
from app.domain.keys.schemas import KeyCreate, KeyCreated, KeyOut
from app.errors import invalid, not_found


class ApiKeyRepository(SQLAlchemyAsyncRepository[ApiKey]):
    model_type = ApiKey


def to_out(key: ApiKey) -> KeyOut:
    return KeyOut(
        id=key.id,
        tenant_id=key.tenant_id,
        kind=key.kind,
        name=key.name,
        scopes=list(key.scopes or []),
        prefix=key.prefix,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        last_used_at=key.last_used_at,
        created_at=key.created_at,
    )


def to_created(key: ApiKey, plaintext: str) -> KeyCreated:
    return KeyCreated(
        id=key.id,
        tenant_id=key.tenant_id,
        kind=key.kind,
        name=key.name,
        scopes=list(key.scopes or []),
        prefix=key.prefix,
        key=plaintext,
        expires_at=key.expires_at,
        created_at=key.created_at,
    )


class ApiKeyService:
    def __init__(self, session: AsyncSession, secret: str) -> None:
        self.repo = ApiKeyRepository(session=session)
        self.secret = secret

    async def _issue(
        self,
        *,
        kind: str,
        tenant_id: UUID | None,
        name: str | None,
        scopes: list[str],
        expires_at: datetime | None,
    ) -> KeyCreated:
        plaintext = generate_key()
        key = ApiKey(
            kind=kind,
            tenant_id=tenant_id,
            name=name,
            scopes=scopes,
            prefix=key_prefix(plaintext),
            key_hash=hash_key(self.secret, plaintext),
            expires_at=expires_at,
        )
        key = await self.repo.add(key)
        return to_created(key, plaintext)

    async def create_tenant_key(self, tenant_id: UUID, data: KeyCreate) -> KeyCreated:
        if data.expires_at is not None and data.expires_at <= datetime.now(UTC):
            raise invalid("expires_at must be in the future", param="expires_at")
        scopes = sorted({str(s) for s in data.scopes})
        return await self._issue(
            kind="tenant", tenant_id=tenant_id, name=data.name, scopes=scopes, expires_at=data.expires_at
        )

    async def create_admin_key(self, name: str | None = None) -> KeyCreated:
        return await self._issue(kind="admin", tenant_id=None, name=name, scopes=[], expires_at=None)

    async def count_admin_keys(self) -> int:
        return await self.repo.count(kind="admin", revoked_at=None)

    async def list_for_tenant(self, tenant_id: UUID) -> list[KeyOut]:
        keys = await self.repo.get_many(
            OrderBy(field_name="created_at", sort_order="asc"), tenant_id=tenant_id
        )
        return [to_out(k) for k in keys]

    async def revoke(self, key_id: UUID) -> ApiKey:
        """Revoke a key; revoking an already revoked key keeps its first revocation time."""
        key = await self.repo.get_one_or_none(id=key_id)
        if key is None:
            raise not_found("API key", param="key_id")
        if key.revoked_at is None:
            key.revoked_at = datetime.now(UTC)
            key = await self.repo.update(key)
        return key
