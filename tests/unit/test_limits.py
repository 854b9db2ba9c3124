"""The in-process limiter's rules on exact numbers, with a hand-driven clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.limits import Limiter, TenantLimits
from app.limits.types import format_duration, month_window

T0 = datetime(2026, 3, 31, 23, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limits(**kw: int | None) -> TenantLimits:
    return TenantLimits(tenant_id="t1", **kw)  # type: ignore[arg-type]


def test_month_window_rolls_over_year_end() -> None:
    assert month_window(datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()) == (
        "202612",
        datetime(2027, 1, 1, tzinfo=UTC).timestamp(),
    )
    assert month_window(T0)[0] == "202603"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.25, "250ms"),
        (1.5, "1.5s"),
        (59.99, "60s"),
        (360, "6m0s"),
        (3725, "1h2m5s"),
    ],
)
def test_reset_durations_use_openai_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


async def test_requests_per_minute_boundary_and_refill() -> None:
    clock = Clock()
    limiter = Limiter(clock=clock)
    tenant = limits(requests_per_minute=6)
    for i in range(6):
        a = await limiter.admit(tenant, 0)
        assert a.allowed and a.headers["x-ratelimit-remaining-requests"] == str(5 - i)
    refused = await limiter.admit(tenant, 0)
    assert not refused.allowed and refused.reason == "requests"
    assert refused.retry_after == pytest.approx(10.0)
    assert refused.retry_after_header == {"retry-after": "10", "retry-after-ms": "10000"}
    assert refused.headers["x-ratelimit-limit-requests"] == "6"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.now += 9.9
    assert not (await limiter.admit(tenant, 0)).allowed
    clock.now += 0.1
    assert (await limiter.admit(tenant, 0)).allowed


async def test_tokens_reserved_then_refunded_once() -> None:
    clock = Clock()
    limiter = Limiter(clock=clock)
    tenant = limits(tokens_per_minute=1000)
    first = await limiter.admit(tenant, 400)
    second = await limiter.admit(tenant, 400)
    assert first.allowed and second.allowed
    assert second.headers["x-ratelimit-remaining-tokens"] == "200"
    third = await limiter.admit(tenant, 400)
    assert not third.allowed and third.reason == "tokens"
    assert third.retry_after == pytest.approx(200 * 60 / 1000)
    await limiter.settle(first, 100)  # 300 unused come back
    await limiter.settle(first, 100)  # and only once
    again = await limiter.admit(tenant, 400)
    assert again.allowed and again.headers["x-ratelimit-remaining-tokens"] == "100"


async def test_request_larger_than_the_minute_budget_never_retries() -> None:
    limiter = Limiter(clock=Clock())
    refused = await limiter.admit(limits(tokens_per_minute=100), 101)
    assert not refused.allowed and refused.reason == "request_too_large"
    assert refused.retry_after is None and refused.retry_after_header == {}


async def test_concurrency_slot_released_by_settle_and_by_lease_expiry() -> None:
    clock = Clock()
    limiter = Limiter(clock=clock, lease_ttl_s=30)
    tenant = limits(max_concurrent_requests=2)
    a, b = await limiter.admit(tenant, 1), await limiter.admit(tenant, 1)
    refused = await limiter.admit(tenant, 1)
    assert a.allowed and b.allowed and not refused.allowed and refused.reason == "concurrency"
    await limiter.settle(refused, 0)  # settling a refusal must not free someone else's slot
    assert await limiter.running("t1") == 2
    await limiter.settle(a, 1)
    assert await limiter.running("t1") == 1
    assert (await limiter.admit(tenant, 1)).allowed
    clock.now += 31  # a crashed request's slot comes back after the lease
    assert await limiter.running("t1") == 0


async def test_monthly_quota_counts_from_baseline_and_resets_next_month() -> None:
    clock = Clock()
    asked: list[tuple[str, str]] = []

    async def baseline(tenant_id: str, month: str) -> int:
        asked.append((tenant_id, month))
        return 700

    limiter = Limiter(clock=clock, quota_baseline=baseline)
    tenant = limits(monthly_token_quota=1000)
    ok = await limiter.admit(tenant, 300)
    assert ok.allowed
    refused = await limiter.admit(tenant, 1)
    assert not refused.allowed and refused.reason == "quota"
    assert refused.retry_after == pytest.approx(3600.0)  # T0 is one hour before April
    await limiter.settle(ok, 250)
    assert (await limiter.admit(tenant, 50)).allowed
    assert not (await limiter.admit(tenant, 1)).allowed
    clock.now += 3600
    assert (await limiter.admit(tenant, 1000 - 700)).allowed
    assert asked == [("t1", "202603"), ("t1", "202604")]


async def test_zero_limits_refuse_without_retry() -> None:
    limiter = Limiter(clock=Clock())
    for kw, reason in [("requests_per_minute", "requests"), ("max_concurrent_requests", "concurrency")]:
        refused = await limiter.admit(limits(**{kw: 0}), 1)
        assert not refused.allowed and refused.reason == reason and refused.retry_after is None


async def test_no_limits_admits_and_sends_no_rate_headers() -> None:
    limiter = Limiter(clock=Clock())
    a = await limiter.admit(limits(), 10**9)
    assert a.allowed and a.headers == {} and a.backend == "memory"


async def test_negative_limit_is_zero_not_unlimited() -> None:
    class Tenant:
        id = "t9"
        requests_per_minute = -5
        tokens_per_minute = None
        max_concurrent_requests = None
        monthly_token_quota = None

    assert TenantLimits.of(Tenant()).requests_per_minute == 0
    assert not (await Limiter(clock=Clock()).admit(Tenant(), 1)).allowed


async def test_quota_baseline_failure_is_not_mistaken_for_redis_down() -> None:
    from app.errors import ApiError

    async def database_down(tenant_id: str, month: str) -> int:
        raise ApiError(503, "database unavailable", code="database_unavailable")

    limiter = Limiter(clock=Clock(), quota_baseline=database_down)
    with pytest.raises(ApiError) as err:
        await limiter.admit(limits(monthly_token_quota=10), 1)
    assert err.value.status_code == 503
    # Without a quota the database is not asked at all.
    assert (await limiter.admit(limits(tokens_per_minute=10), 1)).allowed


async def test_fifty_concurrent_admissions_in_process_admit_exactly_n() -> None:
    import asyncio

    limiter = Limiter(clock=Clock())
    tenant = limits(max_concurrent_requests=7, tokens_per_minute=10_000)
    admissions = await asyncio.gather(*(limiter.admit(tenant, 100) for _ in range(50)))
    admitted = [a for a in admissions if a.allowed]
    assert len(admitted) == 7 and await limiter.running("t1") == 7
    await asyncio.gather(*(limiter.settle(a, 100) for a in admissions))
    assert await limiter.running("t1") == 0
    # Only the admitted ones took tokens, and settling spent them (used == reserved).
    assert (await limiter.admit(tenant, 0)).headers["x-ratelimit-remaining-tokens"] == str(10_000 - 700)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LORAPLEX_REDIS_TIMEOUT_SECONDS", "0"),
        ("LORAPLEX_REDIS_KEY_PREFIX", "lpx:{evil}"),
        ("LORAPLEX_USAGE_SWEEP_AFTER_SECONDS", "5"),
        ("LORAPLEX_USAGE_SWEEP_INTERVAL_SECONDS", "-1"),
        ("LORAPLEX_USAGE_RETRY_SECONDS", "0"),
        ("LORAPLEX_USAGE_DB_TIMEOUT_SECONDS", "soon"),
    ],
)
def test_bad_metering_settings_name_the_variable(variable: str, value: str) -> None:
    from app.config import Settings, SettingsError

    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})
    assert Settings.from_env({}).usage_sweep_after_seconds == 900.0
