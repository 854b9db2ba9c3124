"""Bearer key -> Principal, with a short cache and batched `last_used_at` writes.

The cache keeps a key's row (not a verdict) for at most `ttl` seconds, and expiry is checked on every
call, so a revoked key or a suspended tenant stops working within `ttl` (<= 5 s, enforced by Settings)
even in other processes; in this process revocation evicts the entry at once. The tenant's limits come
with the key's row and are as fresh, so a completion holds no database session to read them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.keys import hash_key, key_prefix, looks_like_key, same_hash
from app.auth.principal import Principal
from app.domain.keys.models import ApiKey
from app.domain.tenants.models import Tenant
from app.errors import ApiError
from app.limits.types import TenantLimits
from app.logging import request_context

log = logging.getLogger(__name__)

_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal
    revoked: bool
    expires_at: datetime | None
    tenant_suspended: bool
    fetched: float


def unauthorized(message: str, code: str = "invalid_api_key") -> ApiError:
    return ApiError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


class KeyAuthenticator:
    def __init__(
        self,
        session_maker: Callable[[], AsyncSession],
        secret: str,
        admin_key: str | None,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session_maker = session_maker
        self._secret = secret
        self._admin_hash = hash_key(secret, admin_key) if admin_key else None
        self._ttl = ttl_seconds
        self._clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._last_used: dict[UUID, datetime] = {}
        self._loading: dict[str, asyncio.Future[_Entry]] = {}

    async def authenticate(self, token: str) -> Principal:
        """The caller behind `token`; ApiError 401 (unknown, revoked, expired) or 403 (suspended tenant)."""
        digest = hash_key(self._secret, token)
        if self._admin_hash is not None and same_hash(digest, self._admin_hash):
            return Principal(kind="admin", tenant_id=None, key_id=None, scopes=frozenset())
        entry = self._cached(digest)
        if entry is None:
            entry = await self._load_once(token, digest)
        return self._check(entry)

    async def _load_once(self, token: str, digest: str) -> _Entry:
        # One lookup per key however many requests arrive with it at once: a burst of a cold key must
        # not take one pooled connection per request.
        loading = self._loading.get(digest)
        if loading is None:
            loading = asyncio.ensure_future(self._load(token, digest))
            self._loading[digest] = loading
            loading.add_done_callback(lambda _: self._loading.pop(digest, None))
        return await asyncio.shield(loading)

    def _cached(self, digest: str) -> _Entry | None:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        if self._clock() - entry.fetched >= self._ttl:
            del self._cache[digest]
            return None
        self._cache.move_to_end(digest)
        return entry

    async def _load(self, token: str, digest: str) -> _Entry:
        if not looks_like_key(token):
            raise unauthorized("Invalid API key")
        async with self._session_maker() as session:
            rows = await session.execute(
                select(ApiKey, Tenant)
                .outerjoin(Tenant, Tenant.id == ApiKey.tenant_id)
                .where(ApiKey.prefix == key_prefix(token))
            )
            match = next((r for r in rows.all() if same_hash(r[0].key_hash, digest)), None)
        if match is None:
            raise unauthorized("Invalid API key")
        key, tenant = match
        entry = _Entry(
            principal=Principal(
                kind="admin" if key.kind == "admin" else "tenant",
                tenant_id=key.tenant_id,
                key_id=key.id,
                scopes=frozenset(key.scopes or ()),
                limits=TenantLimits.of(tenant) if tenant is not None else None,
            ),
            revoked=key.revoked_at is not None,
            expires_at=key.expires_at,
            tenant_suspended=tenant is not None and tenant.status == "suspended",
            fetched=self._clock(),
        )
        if self._ttl > 0:
            self._cache[digest] = entry
            while len(self._cache) > _CACHE_MAX:
                self._cache.popitem(last=False)
        return entry

    def _check(self, entry: _Entry) -> Principal:
        if entry.revoked:
            raise unauthorized("API key has been revoked", code="api_key_revoked")
        now = datetime.now(UTC)
        if entry.expires_at is not None and entry.expires_at <= now:
            raise unauthorized("API key has expired", code="api_key_expired")
        if entry.tenant_suspended:
            # The key is genuine, so the log line of this refusal may name its tenant.
            ctx = request_context.get()
            if ctx is not None and entry.principal.tenant_id is not None:
                ctx.tenant_id = str(entry.principal.tenant_id)
            raise ApiError(403, "Tenant is suspended", code="tenant_suspended")
        if entry.principal.key_id is not None:
            self._last_used[entry.principal.key_id] = now
        return entry.principal

    def forget_key(self, key_id: UUID) -> None:
        """Drop a key from this process's cache at once (after revocation)."""
        for digest in [d for d, e in self._cache.items() if e.principal.key_id == key_id]:
            del self._cache[digest]

    def forget_tenant(self, tenant_id: UUID) -> None:
        """Drop a tenant's keys from this process's cache at once (after a status change)."""
        for digest in [d for d, e in self._cache.items() if e.principal.tenant_id == tenant_id]:
            del self._cache[digest]

    async def flush_last_used(self) -> int:
        """Write the pending `last_used_at` times in one transaction; returns how many keys were written."""
        pending, self._last_used = self._last_used, {}
        if not pending:
            return 0
        try:
            async with self._session_maker() as session, session.begin():
                for key_id, used_at in pending.items():
                    await session.execute(
                        update(ApiKey)
                        .where(ApiKey.id == key_id)
                        .values(last_used_at=used_at)
                        .execution_options(synchronize_session=False)
                    )
        except Exception:
            # Keep the times for the next attempt; a lost update only makes last_used_at older.
            for key_id, used_at in pending.items():
                self._last_used.setdefault(key_id, used_at)
            log.warning("could not write last_used_at for %d keys", len(pending), exc_info=True)
            return 0
        return len(pending)
