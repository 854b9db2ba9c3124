"""kill -9 with a reservation in flight, restart, sweep: the monthly quota counts only what was billed.

A real `loraplex serve` child process is killed mid-stream, so its usage row stays `reserved` and (with
Redis) its tokens stay counted in Redis. A second process starts on the same database; the first request
there counts the dead reservation (its row is still `reserved`). The row is then made old enough for the
sweeper (as if `LORAPLEX_USAGE_SWEEP_AFTER_SECONDS` had passed) and swept: the quota minus what was billed
must then be usable, with the in-process limiter, and with Redis, also when Redis is unreachable while
the sweeper runs.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability.conftest import (
    ADMIN,
    REDIS_URL,
    ServeProcess,
    TcpProxy,
    execute,
    read_usage,
    serve_env,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.timeout(300)]

QUOTA = 500  # the demo model's context is 512 tokens: the whole quota fits one request
STALE_MAX_TOKENS = 300


def _admin(server: ServeProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=ADMIN, timeout=60)


def _tenant_and_key(server: ServeProcess) -> tuple[str, str]:
    with _admin(server) as admin:
        r = admin.post(
            "/admin/tenants", json={"name": f"q-{uuid.uuid4().hex[:8]}", "monthly_token_quota": QUOTA}
        )
        assert r.status_code == 201, r.text
        tenant_id = r.json()["id"]
        r = admin.post(f"/admin/tenants/{tenant_id}/api-keys", json={"scopes": ["completions"]})
        assert r.status_code == 201, r.text
        return tenant_id, r.json()["key"]


def _complete(server: ServeProcess, key: str, max_tokens: int) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/completions",
        json={"model": "demo-model", "prompt": "hi", "max_tokens": max_tokens, "temperature": 0},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


def _kill_mid_stream(server: ServeProcess, key: str) -> str:
    """Start a long stream, read its first token, kill -9 the server; returns the request id."""
    body = {
        "model": "demo-model",
        "prompt": "hi",
        "max_tokens": STALE_MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        server.kill9()
    return str(json.loads(first[6:])["id"])


def _row(database_url: str, request_id: str) -> dict[str, Any]:
    return next(r for r in read_usage(database_url) if r["request_id"] == request_id)


def _crash_restart_sweep(
    database_url: str, env: dict[str, str], tmp_path: Path, while_sweeping: Any = None, after: Any = None
) -> None:
    first = ServeProcess(env, tmp_path / "first.log")
    first.start()
    second = ServeProcess({**env}, tmp_path / "second.log")
    try:
        _, key = _tenant_and_key(first)
        stale = _kill_mid_stream(first, key)
        assert _row(database_url, stale)["status"] == "reserved"

        second.start()
        small = _complete(second, key, 2)
        assert small.status_code == 200, small.text
        usage = small.json()["usage"]
        billed, prompt = usage["total_tokens"], usage["prompt_tokens"]
        rest = QUOTA - billed  # what the tenant may still use once the dead reservation is gone
        refused = _complete(second, key, rest - prompt)
        assert refused.status_code == 429, refused.text  # the dead reservation still counts

        if while_sweeping is not None:
            while_sweeping()
        # As if LORAPLEX_USAGE_SWEEP_AFTER_SECONDS had passed since the dead request began.
        execute(
            database_url,
            f"UPDATE usage_records SET created_at = created_at - interval '5 minutes' WHERE request_id = '{stale}'"
            if not database_url.startswith("sqlite")
            else f"UPDATE usage_records SET created_at = datetime(created_at, '-5 minutes') WHERE request_id = '{stale}'",
        )
        wait_for(lambda: _row(database_url, stale)["status"] == "expired", 30, "the sweeper expired the row")
        if after is not None:
            after()

        full = _complete(second, key, rest - prompt)
        assert full.status_code == 200, full.text
    finally:
        first.stop()
        second.stop()


def test_in_process_limiter_quota_after_kill9(demo_model: Path, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'loraplex.db'}"
    env = serve_env(
        tmp_path / "data",
        demo_model,
        url,
        LORAPLEX_USAGE_SWEEP_INTERVAL_SECONDS="0.5",
        LORAPLEX_USAGE_SWEEP_AFTER_SECONDS="60",
    )
    _crash_restart_sweep(url, env, tmp_path)


def test_redis_quota_after_kill9_with_redis_down_while_sweeping(
    demo_model: Path, module_database: str, tmp_path: Path
) -> None:
    import redis

    host_port, db = REDIS_URL.removeprefix("redis://").rsplit("/", 1)
    proxy = TcpProxy(int(host_port.rsplit(":", 1)[1]), host_port.rsplit(":", 1)[0])
    proxy.start()
    env = serve_env(
        tmp_path / "data",
        demo_model,
        module_database,
        LORAPLEX_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/{db}",
        LORAPLEX_USAGE_SWEEP_INTERVAL_SECONDS="0.5",
        LORAPLEX_USAGE_SWEEP_AFTER_SECONDS="60",
    )

    def redis_back() -> None:
        proxy.start()
        time.sleep(3)  # past the limiter's retry interval (2 s): the next admission goes to Redis again

    try:
        _crash_restart_sweep(module_database, env, tmp_path, while_sweeping=proxy.stop, after=redis_back)
        # The last admission was Redis's: its month counter holds the billed tokens, not the dead ones.
        client = redis.Redis.from_url(REDIS_URL)
        prefix = env["LORAPLEX_REDIS_KEY_PREFIX"]
        counters = [int(client.get(k) or 0) for k in client.scan_iter(f"{prefix}:*:m:*")]
        client.close()
        assert counters and max(counters) <= QUOTA
    finally:
        proxy.stop()
