"""The embedded default (SQLite): metering and every billing grouping work there too."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.ext.asyncio import async_sessionmaker

from app.db.migrate import upgrade
from app.domain.usage.billing import usage_rows
from tests.integration.usage.usage_db import add_tenant, metering_on


async def test_metering_and_billing_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"
    upgrade(url, "head")
    async with metering_on(url) as (metering, engine):
        tenant = await add_tenant(engine, "solo")
        await metering.reserve("s1", tenant, None, None, None, "base", 10, 5)
        assert await metering.settle("s1", 10, 2, 4, "stop", "ok")
        assert not await metering.settle("s1", 10, 2, 4, "stop", "ok")
        await metering.reserve("s2", tenant, None, None, None, "base", 3, 5)
        month = datetime.now(UTC).strftime("%Y%m")
        assert await metering.month_tokens(str(tenant), month) == 14 + 8
        assert await metering.sweep(0, now=datetime.now(UTC) + timedelta(seconds=1)) == 1
        now = datetime.now(UTC)
        async with async_sessionmaker(engine)() as session:
            rows = {
                group: await usage_rows(
                    session,
                    start=now - timedelta(days=1),
                    end=now + timedelta(days=1),
                    tenant_id=None,
                    group_by=group,
                )
                for group in ("tenant", "day", "adapter")
            }
    assert [(r["tenant_name"], r["requests"], r["total_tokens"]) for r in rows["tenant"]] == [("solo", 2, 14)]
    assert [r["day"] for r in rows["day"]] == [now.date().isoformat()]
    assert [(r["adapter_id"], r["model"]) for r in rows["adapter"]] == [(None, "base")]
