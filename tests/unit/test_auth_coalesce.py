"""A burst of requests with one cold key costs one lookup, and the key's tenant limits ride along."""

from __future__ import annotations

import asyncio

from app.auth.authenticator import KeyAuthenticator
from app.limits import TenantLimits
from tests.unit.test_auth_cache import SECRET, _setup, db  # noqa: F401


def test_concurrent_requests_with_one_cold_key_share_one_lookup(db) -> None:  # noqa: F811
    async def run() -> None:
        engine, maker, tenant_id, created = await _setup(db)
        sessions = 0

        def counting_maker():  # type: ignore[no-untyped-def]
            nonlocal sessions
            sessions += 1
            return maker()

        auth = KeyAuthenticator(counting_maker, SECRET, None, ttl_seconds=2.0)
        principals = await asyncio.gather(*(auth.authenticate(created.key) for _ in range(50)))
        assert sessions == 1
        assert {p.tenant_id for p in principals} == {tenant_id}
        # The limits a completion is admitted with come from that same lookup.
        assert principals[0].limits == TenantLimits(tenant_id=str(tenant_id))
        await engine.dispose()

    asyncio.run(run())
