"""When the server really is full the answer is decided up front: past `max_num_seqs +
max_queued_requests` runs in flight a new request gets 503 `server_overloaded` with `Retry-After` at
once (no limit touched, no usage row written), and capacity comes back as runs finish."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import LiveServer, demo_model, start_server  # noqa: F401

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

CLIENTS = 8


@pytest.fixture(scope="module")
def small_server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:  # noqa: F811
    from app.db.migrate import upgrade

    data = tmp_path_factory.mktemp("data")
    url = f"sqlite+aiosqlite:///{data / 'loraplex.db'}"
    upgrade(url, "head")
    server = start_server(demo_model, data, url, redis_url=None, max_num_seqs=1, max_queued_requests=1)
    try:
        yield server
    finally:
        server.stop()


def test_a_full_server_answers_503_at_once_and_recovers(small_server: LiveServer) -> None:
    key = small_server.key(small_server.tenant()["id"])
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "demo-model", "prompt": "capacity", "max_tokens": 64, "ignore_eos": True}

    async def one(client: httpx.AsyncClient) -> tuple[int, float, httpx.Response]:
        started = time.monotonic()
        r = await client.post("/v1/completions", json=body, headers=headers)
        return r.status_code, time.monotonic() - started, r

    async def burst() -> list[tuple[int, float, httpx.Response]]:
        async with httpx.AsyncClient(base_url=small_server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(CLIENTS)))

    results = asyncio.run(burst())
    served = [r for status, _, r in results if status == 200]
    refused = [(seconds, r) for status, seconds, r in results if status == 503]
    assert len(served) + len(refused) == CLIENTS, [r.text for _, _, r in results]
    assert 1 <= len(served) <= 2 and len(refused) >= CLIENTS - 2, [s for s, _, _ in results]
    for seconds, r in refused:
        assert r.json()["error"]["code"] == "server_overloaded", r.text
        assert r.headers["retry-after"] == "1"
        assert seconds < 2.0  # decided up front, not after a wait
    rows = small_server.usage_rows()
    assert sorted(r["request_id"] for r in rows) == sorted(r.json()["id"] for r in served)
    # The runs settled, so the server takes requests again.
    again = httpx.post(small_server.url + "/v1/completions", json=body, headers=headers, timeout=120)
    assert again.status_code == 200, again.text
