"""The limiter, the metering service, its sweeper and the metrics registry, for the life of one app.

They live in `app.state` (never in module globals) and are reached with `limiter_of(app)`,
`metering_of(app)` and `metrics_of(app)`. `Metrics` exists from `create_app` on (the `/metrics` route
needs no lifespan); the limiter and metering service are built when the app starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

from litestar import Litestar

from app.config import Settings
from app.db.session import session_maker
from app.domain.usage.metering import Expired, Metering, OnExpired, database_down
from app.limits import Limiter
from app.metrics import Metrics

log = logging.getLogger(__name__)

LIMITER_STATE_KEY = "limiter"
METERING_STATE_KEY = "metering"
METRICS_STATE_KEY = "metrics"


def limiter_of(app: Litestar) -> Limiter:
    return cast("Limiter", app.state[LIMITER_STATE_KEY])


def metering_of(app: Litestar) -> Metering:
    return cast("Metering", app.state[METERING_STATE_KEY])


def metrics_of(app: Litestar) -> Metrics:
    return cast("Metrics", app.state[METRICS_STATE_KEY])


@asynccontextmanager
async def usage_services(app: Litestar) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metering = Metering(
        session_maker(app),
        timeout_s=settings.usage_db_timeout_seconds,
        retry_s=settings.usage_retry_seconds,
        single_writer=settings.is_sqlite,
    )
    limiter = Limiter(
        settings.redis_url,
        key_prefix=settings.redis_key_prefix,
        redis_timeout_s=settings.redis_timeout_seconds,
        lease_ttl_s=settings.usage_sweep_after_seconds,
        quota_baseline=metering.month_tokens,
    )
    metrics = metrics_of(app)
    metrics.bind_limiter(limiter)
    metrics.bind_metering(metering)
    app.state[LIMITER_STATE_KEY] = limiter
    app.state[METERING_STATE_KEY] = metering
    metering.start()

    async def forget(expired: list[Expired]) -> None:
        metrics.usage_expired.inc(len(expired))
        for row in expired:
            await limiter.release_quota(row.tenant_id, row.month, row.reserved_tokens)

    sweeper = asyncio.create_task(
        _sweep_forever(
            metering, settings.usage_sweep_after_seconds, settings.usage_sweep_interval_seconds, forget
        ),
        name="usage-sweeper",
    )
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await metering.stop()
        await limiter.close()


async def _sweep_forever(
    metering: Metering, older_than_s: float, interval_s: float, forget: OnExpired
) -> None:
    while True:
        try:
            await metering.sweep(older_than_s, on_expired=forget)
        except Exception as exc:
            # The sweeper must outlive any one failure: log and look again next interval.
            if database_down(exc):
                log.warning("usage sweeper: database unavailable: %s", exc)
            else:
                log.exception("usage sweeper failed")
        await asyncio.sleep(interval_s)
