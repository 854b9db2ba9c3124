"""The Lua script and the in-process limiter are one set of rules: a random workload run through both,
on the same clock, gets the same answer at every step."""

from __future__ import annotations

import random
import uuid

import pytest

from app.limits import Limiter, TenantLimits
from tests.integration.limits.test_limiter_redis import T0, Clock


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_redis_and_memory_decide_alike(redis_url: str, seed: int) -> None:
    rng = random.Random(seed)
    clock = Clock(T0 - 30 * 60)  # crosses into a new month half way

    async def baseline(tenant_id: str, month: str) -> int:
        return 50

    redis = Limiter(
        redis_url,
        key_prefix=f"lpxpar{uuid.uuid4().hex[:6]}",
        clock=clock,
        quota_baseline=baseline,
        lease_ttl_s=20,
    )
    memory = Limiter(None, clock=clock, quota_baseline=baseline, lease_ttl_s=20)
    tenants = [
        TenantLimits(
            str(uuid.uuid4()),
            requests_per_minute=rng.choice([None, 5, 30]),
            tokens_per_minute=rng.choice([None, 300, 1000]),
            max_concurrent_requests=rng.choice([None, 2, 4]),
            monthly_token_quota=rng.choice([None, 2000, 8000]),
        )
        for _ in range(3)
    ]
    held: list[tuple[object, object]] = []
    for step in range(150):
        clock.now += rng.choice([0.0, 0.0, 0.5, 3.0, 25.0]) if step % 3 == 0 else 0.0
        if held and rng.random() < 0.4:
            a, b = held.pop(rng.randrange(len(held)))
            used = rng.randrange(0, a.reserved_tokens + 1)  # type: ignore[attr-defined]
            await redis.settle(a, used)  # type: ignore[arg-type]
            await memory.settle(b, used)  # type: ignore[arg-type]
            continue
        tenant = rng.choice(tenants)
        reserve = rng.choice([1, 20, 150, 400])
        a, b = await redis.admit(tenant, reserve), await memory.admit(tenant, reserve)
        assert a.backend == "redis" and b.backend == "memory"
        assert (a.allowed, a.reason, a.headers) == (b.allowed, b.reason, b.headers), step
        assert (a.retry_after is None) == (b.retry_after is None), step
        if a.retry_after is not None:
            assert a.retry_after == pytest.approx(b.retry_after, abs=1e-6), step
        if a.allowed:
            held.append((a, b))
        assert await redis.running(tenant.tenant_id) == await memory.running(tenant.tenant_id), step
    await redis.close()
