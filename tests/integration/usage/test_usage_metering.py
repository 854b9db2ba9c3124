"""Metering against the real PostgreSQL: one row per request, settled exactly once, swept after a
crash, and PostgreSQL going away (new requests refused, in-flight settles retried and written once)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from app.domain.usage.metering import Expired, Metering
from app.domain.usage.models import UsageRecord
from app.errors import ApiError
from tests.integration.conftest import free_port
from tests.integration.usage.usage_db import add_tenant, metering_on, rename_database


async def row(engine, request_id: str) -> UsageRecord:  # type: ignore[no-untyped-def]
    async with async_sessionmaker(engine)() as session:
        return (
            await session.execute(select(UsageRecord).where(UsageRecord.request_id == request_id))
        ).scalar_one()


async def reserve(metering: Metering, tenant_id: uuid.UUID, request_id: str, prompt: int = 10) -> None:
    await metering.reserve(request_id, tenant_id, uuid.uuid4(), None, None, "base", prompt, 32)


async def test_reserve_then_settle_once(usage_database_url: str) -> None:
    async with metering_on(usage_database_url) as (metering, engine):
        tenant = await add_tenant(engine)
        await metering.reserve("r1", str(tenant), None, uuid.uuid4(), 3, "bot@3", 12, 20)
        r = await row(engine, "r1")
        assert (r.status, r.reserved_tokens, r.prompt_tokens, r.completion_tokens) == ("reserved", 32, 12, 0)
        assert (r.adapter_version, r.model, r.settled_at) == (3, "bot@3", None)

        assert await metering.settle("r1", 12, 8, 5, "stop", "ok", 0.01, 0.05, 0.3)
        assert not await metering.settle("r1", 99, 0, 99, "length", "error")
        r = await row(engine, "r1")
        assert (r.status, r.prompt_tokens, r.cached_tokens, r.completion_tokens) == ("ok", 12, 8, 5)
        assert (r.finish_reason, r.queue_time_s, r.ttft_s, r.latency_s) == ("stop", 0.01, 0.05, 0.3)
        assert r.settled_at is not None

        with pytest.raises(ApiError) as dup:
            await reserve(metering, tenant, "r1")
        assert dup.value.status_code == 409
        with pytest.raises(ValueError):
            await metering.settle("r1", 1, 0, 1, "stop", "reserved")


async def test_concurrent_settles_from_two_processes_write_once(usage_database_url: str) -> None:
    async with metering_on(usage_database_url) as (a, engine), metering_on(usage_database_url) as (b, _):
        tenant = await add_tenant(engine)
        await reserve(a, tenant, "race")
        settles = [(a if i % 2 else b).settle("race", 10, 0, i + 1, "stop", "ok") for i in range(20)]
        results = await asyncio.gather(*settles)
        assert sum(results) == 1
        winner = results.index(True)
        assert (await row(engine, "race")).completion_tokens == winner + 1


async def test_cached_tokens_never_exceed_prompt_and_negatives_clamp(usage_database_url: str) -> None:
    async with metering_on(usage_database_url) as (metering, engine):
        tenant = await add_tenant(engine)
        await reserve(metering, tenant, "odd")
        assert await metering.settle("odd", 4, 40, -3, None, "aborted")
        r = await row(engine, "odd")
        assert (r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.status) == (4, 4, 0, "aborted")


async def test_sweeper_expires_only_old_reservations_and_a_late_settle_wins(usage_database_url: str) -> None:
    async with metering_on(usage_database_url) as (metering, engine):
        tenant = await add_tenant(engine)
        await reserve(metering, tenant, "crashed", prompt=50)
        await reserve(metering, tenant, "running")
        await reserve(metering, tenant, "done")
        await metering.settle("done", 10, 0, 3, "stop", "ok")
        async with async_sessionmaker(engine)() as session:
            await session.execute(
                update(UsageRecord)
                .where(UsageRecord.request_id == "crashed")
                .values(created_at=datetime.now(UTC) - timedelta(hours=1))
            )
            await session.commit()

        heard: list[Expired] = []

        async def on_expired(rows: list[Expired]) -> None:
            heard.extend(rows)

        assert await metering.sweep(older_than_s=900, on_expired=on_expired) == 1
        assert await metering.sweep(older_than_s=900, on_expired=on_expired) == 0
        month = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y%m")
        assert heard == [Expired(str(tenant), month, 50 + 32)]
        crashed, running, done = [await row(engine, r) for r in ("crashed", "running", "done")]
        assert (crashed.status, crashed.prompt_tokens, crashed.completion_tokens) == ("expired", 0, 0)
        assert crashed.reserved_tokens == 82 and crashed.settled_at is not None
        assert running.status == "reserved" and (done.status, done.completion_tokens) == ("ok", 3)

        # The sweeper guessed; a settle that turns up later carries the real numbers.
        assert await metering.settle("crashed", 50, 0, 7, "stop", "ok")
        assert (await row(engine, "crashed")).completion_tokens == 7


async def test_month_tokens_is_the_quota_baseline(usage_database_url: str) -> None:
    async with metering_on(usage_database_url) as (metering, engine):
        tenant, other = await add_tenant(engine), await add_tenant(engine)
        await reserve(metering, tenant, "settled", prompt=10)  # reserves 42
        await metering.settle("settled", 10, 0, 5, "stop", "ok")
        await reserve(metering, tenant, "in-flight", prompt=8)  # counts its whole reservation: 40
        await reserve(metering, other, "someone-else")
        await reserve(metering, tenant, "failed", prompt=30)
        await metering.settle("failed", 30, 0, 4, "error", "error")  # not billed, not counted
        await reserve(metering, tenant, "last-month")
        async with async_sessionmaker(engine)() as session:
            await session.execute(
                update(UsageRecord)
                .where(UsageRecord.request_id == "last-month")
                .values(created_at=datetime.now(UTC).replace(day=1) - timedelta(days=2))
            )
            await session.commit()
        month = datetime.now(UTC).strftime("%Y%m")
        assert await metering.month_tokens(str(tenant), month) == 15 + 40


async def test_database_on_a_closed_port_refuses_new_requests_fast() -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"
    async with metering_on(url, timeout_s=3) as (metering, _):
        started = time.monotonic()
        with pytest.raises(ApiError) as err:
            await metering.reserve("r", uuid.uuid4(), None, None, None, "base", 1, 1)
        assert err.value.status_code == 503 and err.value.code == "database_unavailable"
        assert time.monotonic() - started < 3
        with pytest.raises(ApiError):
            await metering.month_tokens(str(uuid.uuid4()), "202601")
        # A settle never raises for the database; it waits for it.
        assert not await metering.settle("r", 1, 0, 1, "stop", "ok")
        assert metering.pending == 1


async def test_database_gone_mid_request_settle_is_retried_and_written_once(usage_database_url: str) -> None:
    name = usage_database_url.rsplit("/", 1)[1]
    async with metering_on(usage_database_url, retry_s=0.1, max_retry_s=0.5, timeout_s=2) as (
        metering,
        engine,
    ):
        tenant = await add_tenant(engine)
        await reserve(metering, tenant, "inflight")
        metering.start()
        await rename_database(name, name + "_away")
        try:
            with pytest.raises(ApiError) as err:
                await reserve(metering, tenant, "new")
            assert err.value.status_code == 503
            assert not await metering.settle("inflight", 10, 2, 6, "stop", "ok")
            assert not await metering.settle("inflight", 10, 2, 6, "stop", "ok")  # the client retried
            assert metering.pending == 1
            await asyncio.sleep(0.5)  # retries fail meanwhile
            assert metering.pending == 1
        finally:
            await rename_database(name + "_away", name)
        for _ in range(100):
            if metering.pending == 0:
                break
            await asyncio.sleep(0.1)
        assert metering.pending == 0
        r = await row(engine, "inflight")
        assert (r.status, r.completion_tokens, r.cached_tokens) == ("ok", 6, 2)
        assert not await metering.settle("inflight", 10, 2, 99, "stop", "ok")
        async with async_sessionmaker(engine)() as session:
            count = len((await session.execute(select(UsageRecord.id))).all())
        assert count == 1  # the refused request left nothing behind


async def test_settlements_still_waiting_at_shutdown_are_logged_with_their_numbers(caplog) -> None:  # type: ignore[no-untyped-def]
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"
    async with metering_on(url, timeout_s=1) as (metering, _):
        assert not await metering.settle("lost-1", 9, 1, 4, "length", "ok")
        await metering.stop(flush_timeout_s=0.5)
    lines = [r.getMessage() for r in caplog.records if "lost at shutdown" in r.getMessage()]
    assert lines == [
        "usage settlement lost at shutdown: request_id=lost-1 status=ok prompt_tokens=9 "
        "cached_tokens=1 completion_tokens=4 finish_reason=length"
    ]


async def test_wrong_data_is_a_bug_not_an_outage(usage_database_url: str) -> None:
    from sqlalchemy.exc import DBAPIError

    async with metering_on(usage_database_url) as (metering, engine):
        tenant = await add_tenant(engine)
        await metering.reserve("long", tenant, None, None, None, "m" * 500, 3, 3)
        assert (await row(engine, "long")).model == "m" * 200
        assert await metering.settle("long", 3, 0, 1, "x" * 100, "ok")
        assert (await row(engine, "long")).finish_reason == "x" * 32
        with pytest.raises(ValueError):
            await metering.reserve("r" * 65, tenant, None, None, None, "base", 1, 1)
        await reserve(metering, tenant, "huge")
        # A number the column cannot hold is refused at once: never deferred, never retried forever.
        with pytest.raises(DBAPIError):
            await metering.settle("huge", 2**40, 0, 1, "stop", "ok")
        assert metering.pending == 0
        assert (await row(engine, "huge")).status == "reserved"


async def test_many_concurrent_requests_each_get_one_settled_row(usage_database_url: str) -> None:
    from sqlalchemy import func

    async with metering_on(usage_database_url) as (metering, engine):
        tenant = await add_tenant(engine)

        async def one(i: int) -> bool:
            await reserve(metering, tenant, f"load-{i}", prompt=i % 7 + 1)
            first = await metering.settle(f"load-{i}", i % 7 + 1, 0, i % 5, "stop", "ok")
            again = await metering.settle(f"load-{i}", 99, 0, 99, "stop", "ok")
            return first and not again

        assert all(await asyncio.gather(*(one(i) for i in range(120))))
        async with async_sessionmaker(engine)() as session:
            count, completion = (
                await session.execute(
                    select(func.count(UsageRecord.id), func.sum(UsageRecord.completion_tokens)).where(
                        UsageRecord.status == "ok"
                    )
                )
            ).one()
        assert (count, completion) == (120, sum(i % 5 for i in range(120)))
