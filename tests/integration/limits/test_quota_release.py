"""A swept reservation leaves the monthly quota: in-process at once (the month is recounted from the
usage rows), in Redis at once, or, when Redis does not answer during the sweep, when it answers again."""

from __future__ import annotations

import uuid

from redis.exceptions import ConnectionError as RedisConnectionError

from app.limits import Limiter, TenantLimits
from app.limits.types import month_window

QUOTA = 100


class Baseline:
    """The usage rows' count for the month, as metering would answer it."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.calls = 0

    async def __call__(self, tenant_id: str, month: str) -> int:
        self.calls += 1
        return self.tokens


def quota_tenant() -> TenantLimits:
    return TenantLimits(tenant_id=str(uuid.uuid4()), monthly_token_quota=QUOTA)


async def test_in_process_count_is_recounted_after_a_release() -> None:
    # 50 tokens of a dead request still reserved + 10 billed, as read right after a restart.
    baseline = Baseline(60)
    limiter = Limiter(quota_baseline=baseline)
    t = quota_tenant()
    month = month_window(limiter._clock())[0]
    assert not (await limiter.admit(t, QUOTA - 10)).allowed
    baseline.tokens = 10  # the sweeper expired the dead row
    assert await limiter.release_quota(t.tenant_id, month, 50) is False  # no Redis to tell
    admission = await limiter.admit(t, QUOTA - 10)
    assert admission.allowed and baseline.calls == 2
    await limiter.close()


async def test_redis_release_missed_while_redis_is_down_is_replayed(redis_url: str) -> None:
    baseline = Baseline(60)
    limiter = Limiter(redis_url, key_prefix=f"lpxrel{uuid.uuid4().hex[:8]}", quota_baseline=baseline,
                      redis_retry_s=0.01, redis_timeout_s=5.0)  # fmt: skip
    t = quota_tenant()
    month = month_window(limiter._clock())[0]
    refused = await limiter.admit(t, QUOTA - 10)
    assert refused.backend == "redis" and not refused.allowed
    assert limiter._redis is not None
    real = limiter._redis.release_quota

    async def down(*_: object) -> None:
        raise RedisConnectionError("redis is down")

    limiter._redis.release_quota = down  # type: ignore[method-assign]
    assert await limiter.release_quota(t.tenant_id, month, 50) is False
    limiter._redis.release_quota = real  # type: ignore[method-assign]
    limiter._redis_down_until = 0.0  # the retry interval has passed
    admitted = await limiter.admit(t, QUOTA - 10)
    assert admitted.backend == "redis" and admitted.allowed
    await limiter.close()
