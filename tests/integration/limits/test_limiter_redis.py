"""The Redis limiter against a real Redis: atomic admission across processes, boundaries, refunds,
exactly-once settle, and the in-process fallback when Redis is down and the switch back when it returns."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis as redis_sync

from app.limits import Limiter, TenantLimits
from tests.integration.conftest import free_port

T0 = datetime(2026, 3, 31, 23, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def prefix() -> str:
    # Other suites share Redis db 15: our keys never collide with theirs or a previous run's.
    return f"lpxtest{uuid.uuid4().hex[:8]}"


def tenant(**kw: int | None) -> TenantLimits:
    return TenantLimits(tenant_id=str(uuid.uuid4()), **kw)  # type: ignore[arg-type]


async def test_fifty_concurrent_admissions_across_processes_admit_exactly_n(
    redis_url: str, prefix: str
) -> None:
    # Five limiters stand for five API processes sharing one Redis. The timeout is generous: this test is
    # about atomic admission, and 50 first connections at once on a loaded CI machine can take over the
    # 0.5 s default, which (correctly) falls back to the in-process limiter.
    limiters = [Limiter(redis_url, key_prefix=prefix, redis_timeout_s=5.0) for _ in range(5)]
    t = tenant(max_concurrent_requests=7)
    admissions = await asyncio.gather(*(limiters[i % 5].admit(t, 10) for i in range(50)))
    assert {a.backend for a in admissions} == {"redis"}
    admitted = [a for a in admissions if a.allowed]
    assert len(admitted) == 7
    assert {a.reason for a in admissions if not a.allowed} == {"concurrency"}
    assert await limiters[0].running(t.tenant_id) == 7
    await asyncio.gather(*(limiters[3].settle(a, 5) for a in admitted))
    assert await limiters[1].running(t.tenant_id) == 0
    for limiter in limiters:
        await limiter.close()


async def test_rpm_and_tpm_boundaries_with_refund(redis_url: str, prefix: str) -> None:
    clock = Clock()
    limiter = Limiter(redis_url, key_prefix=prefix, clock=clock)
    t = tenant(requests_per_minute=3, tokens_per_minute=900)
    a = await limiter.admit(t, 300)
    b = await limiter.admit(t, 300)
    assert a.allowed and b.allowed and b.backend == "redis"
    assert b.headers == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "40s",
        "x-ratelimit-limit-tokens": "900",
        "x-ratelimit-remaining-tokens": "300",
        "x-ratelimit-reset-tokens": "40s",
    }
    refused = await limiter.admit(t, 301)
    assert not refused.allowed and refused.reason == "tokens"
    assert refused.retry_after == pytest.approx(60 / 900)
    await limiter.settle(a, 100)  # 200 unused come back at once
    c = await limiter.admit(t, 301)
    assert c.allowed and c.headers["x-ratelimit-remaining-tokens"] == "199"
    refused = await limiter.admit(t, 1)
    assert not refused.allowed and refused.reason == "requests"
    assert refused.retry_after == pytest.approx(20.0)
    clock.now += 20
    assert (await limiter.admit(t, 1)).allowed
    await limiter.close()


async def test_request_too_large_and_quota(redis_url: str, prefix: str) -> None:
    clock = Clock()
    calls: list[str] = []

    async def baseline(tenant_id: str, month: str) -> int:
        calls.append(month)
        return 400

    limiter = Limiter(redis_url, key_prefix=prefix, clock=clock, quota_baseline=baseline)
    t = tenant(tokens_per_minute=10_000, monthly_token_quota=1000)
    too_large = await limiter.admit(t, 10_001)
    assert not too_large.allowed and too_large.reason == "request_too_large" and too_large.retry_after is None
    first = await limiter.admit(t, 600)
    assert first.allowed and first.backend == "redis"
    refused = await limiter.admit(t, 1)
    assert not refused.allowed and refused.reason == "quota"
    assert refused.retry_after == pytest.approx(3600.0)
    await limiter.settle(first, 500)
    assert (await limiter.admit(t, 100)).allowed
    assert not (await limiter.admit(t, 1)).allowed
    # A second process shares the counter: it does not ask for the baseline again.
    other = Limiter(redis_url, key_prefix=prefix, clock=clock, quota_baseline=baseline)
    assert not (await other.admit(t, 1)).allowed
    assert calls == ["202603"]
    await limiter.close()
    await other.close()


async def test_concurrent_settles_refund_once(redis_url: str, prefix: str) -> None:
    clock = Clock()
    limiters = [Limiter(redis_url, key_prefix=prefix, clock=clock) for _ in range(3)]
    t = tenant(tokens_per_minute=1000, max_concurrent_requests=5)
    a = await limiters[0].admit(t, 1000)
    assert a.allowed
    # The same admission settled from three processes at once (copies, so the per-object flag
    # cannot help): the script's lease check lets exactly one refund through.
    copies = [type(a)(**{f: getattr(a, f) for f in a.__slots__}) for _ in range(3)]  # type: ignore[attr-defined]
    await asyncio.gather(*(limiters[i].settle(copies[i], 0) for i in range(3)), limiters[0].settle(a, 0))
    b = await limiters[1].admit(t, 1000)
    assert b.allowed and b.headers["x-ratelimit-remaining-tokens"] == "0"
    assert await limiters[2].running(t.tenant_id) == 1
    for limiter in limiters:
        await limiter.close()


async def test_redis_on_a_closed_port_falls_back_fast() -> None:
    limiter = Limiter(f"redis://127.0.0.1:{free_port()}/0", redis_retry_s=60)
    t = tenant(max_concurrent_requests=1)
    started = time.monotonic()
    a = await limiter.admit(t, 1)
    b = await limiter.admit(t, 1)
    assert time.monotonic() - started < 2
    assert a.allowed and a.backend == "memory" and not b.allowed and b.reason == "concurrency"
    assert limiter.backend == "memory" and not await limiter.ping()
    await limiter.settle(a, 1)
    assert (await limiter.admit(t, 1)).allowed
    await limiter.close()


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    assert server, "redis-server is needed on PATH"
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [server, *args, "--enable-debug-command", "local"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis_sync.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(100):
        try:
            if client.ping():
                return proc
        except redis_sync.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def own_redis() -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    port = free_port()
    procs = [_start_redis(port)]
    try:
        yield port, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                _stop(proc)


async def test_redis_stopped_then_restarted(own_redis: tuple[int, list[subprocess.Popen[bytes]]]) -> None:
    port, procs = own_redis
    limiter = Limiter(f"redis://127.0.0.1:{port}/0", redis_retry_s=0.2)
    t = tenant(max_concurrent_requests=3)
    held = await limiter.admit(t, 1)
    assert held.allowed and held.backend == "redis"

    _stop(procs[0])
    during = [await limiter.admit(t, 1) for _ in range(4)]
    assert [a.backend for a in during] == ["memory"] * 4
    assert [a.allowed for a in during] == [True, True, True, False]
    await limiter.settle(held, 1)  # Redis is down: kept and replayed later

    procs.append(_start_redis(port))
    # A restarted Redis has lost its state: put the old lease back to see the replay remove it.
    client = redis_sync.Redis(port=port)
    client.zadd(f"lpx:{{{t.tenant_id}}}:l", {held.id: time.time() + 600})
    time.sleep(0.25)
    after = await limiter.admit(t, 1)
    assert after.allowed and after.backend == "redis"
    assert client.zcard(f"lpx:{{{t.tenant_id}}}:l") == 1  # the replayed settle removed `held`
    assert await limiter.ping()
    await limiter.close()


async def test_reply_lost_to_a_timeout_is_undone_when_redis_answers(
    own_redis: tuple[int, list[subprocess.Popen[bytes]]],
) -> None:
    port, _ = own_redis
    limiter = Limiter(f"redis://127.0.0.1:{port}/0", redis_retry_s=0.2, redis_timeout_s=0.3)
    t = tenant(max_concurrent_requests=5)
    lease_key = f"lpx:{{{t.tenant_id}}}:l"
    stall = redis_sync.Redis(port=port)
    assert (await limiter.admit(tenant(), 1)).backend == "redis"  # a pooled connection, already set up
    # Redis stalls for 1.5 s: the script queued behind the stall runs, but its reply comes too late.
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$3\r\n1.5\r\n")
        time.sleep(0.2)  # blocking on purpose: Redis reads the command and starts sleeping meanwhile
        slow = await limiter.admit(t, 1)
        assert slow.allowed and slow.backend == "memory"
        raw.settimeout(10)
        assert raw.recv(16).startswith(b"+OK")  # the stall is over
    assert stall.zcard(lease_key) == 1  # the lost admission holds a slot in Redis
    time.sleep(0.25)
    fresh = await limiter.admit(t, 1)
    assert fresh.allowed and fresh.backend == "redis"
    assert stall.zrange(lease_key, 0, -1) == [fresh.id.encode()]  # the lost one was undone
    await limiter.settle(slow, 1)  # its real release goes to the memory backend that admitted it
    assert await limiter.running(t.tenant_id) == 1
    await limiter.close()


async def test_quota_of_a_crashed_request_is_released(redis_url: str, prefix: str) -> None:
    clock = Clock()
    limiter = Limiter(redis_url, key_prefix=prefix, clock=clock)
    t = tenant(monthly_token_quota=1000)
    crashed = await limiter.admit(t, 700)  # its process dies: never settled
    assert crashed.allowed and not (await limiter.admit(t, 400)).allowed
    assert await limiter.release_quota(t.tenant_id, crashed.month, 700)
    assert (await limiter.admit(t, 400)).allowed
    # Nothing to release in a month Redis holds no counter for: no key is made.
    assert await limiter.release_quota(t.tenant_id, "202001", 5)
    assert not redis_sync.Redis.from_url(redis_url).exists(f"{prefix}:{{{t.tenant_id}}}:m:202001")
    await limiter.close()
    assert not await Limiter(None).release_quota(t.tenant_id, crashed.month, 1)
