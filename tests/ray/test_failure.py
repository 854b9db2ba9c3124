"""A replica killed mid-stream: its streams end with a clean error event, the others finish, usage rows
match what each client was sent, and Serve brings the replica back (counted again by /ready)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ray.conftest import REPLICAS, replicas_view, sse_events

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STREAMS = 6


def stream(url: str, key: str, model: str, out: dict[str, Any]) -> None:
    body = {
        "model": model,
        "prompt": "hello world",
        "max_tokens": 400,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 0,  # each frame lists its tokens: what the client was told, token by token
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    lines: list[str] = []
    out["lines"] = lines
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(base_url=url, headers=headers, timeout=120) as client,
        client.stream("POST", "/v1/completions", json=body) as r,
    ):
        out["status"] = r.status_code
        for line in r.iter_lines():
            lines.append(line)


def post(url: str, key: str, model: str, out: dict[str, Any]) -> None:
    body = {"model": model, "prompt": "hi", "max_tokens": 8}
    r = httpx.post(
        url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )
    out["status"], out["body"] = r.status_code, r.text


def test_killed_replica_fails_only_its_streams_and_comes_back(ray_server: Any, ray_cluster: Path) -> None:
    tenant = ray_server.tenant()
    key = ray_server.key(tenant["id"])
    models = httpx.get(ray_server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    base = models.json()["data"][0]["id"]
    results: list[dict[str, Any]] = [{} for _ in range(STREAMS)]
    threads = [
        threading.Thread(target=stream, args=(ray_server.url, key, base, results[i])) for i in range(STREAMS)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not all(len(r.get("lines", ())) >= 3 for r in results):  # every stream has its first tokens
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.05)
    view = replicas_view(ray_cluster)
    busy = [v for v in view.values() if v["running"]]
    assert len(view) == REPLICAS and busy
    victim = busy[0]
    os.kill(victim["pid"], signal.SIGKILL)
    # Requests arriving while the routers still count the dead replica: none may fail (one that reached
    # it before any output is sent again to the other replica).
    late = [{} for _ in range(4)]
    late_threads = [threading.Thread(target=post, args=(ray_server.url, key, base, r)) for r in late]
    for t in late_threads:
        t.start()
    for t in threads + late_threads:
        t.join(timeout=120)
    assert [r["status"] for r in late] == [200] * len(late), late

    failed, finished = set(), set()
    for r in results:
        assert r["status"] == 200
        events = sse_events(iter(r["lines"]))
        rid = events[0]["id"]
        errors = [e for e in events if "error" in e]
        if errors:
            assert errors[0]["error"]["code"] == "engine_unavailable", errors
            failed.add(rid)
            r["told"] = sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events if e.get("choices"))
        else:
            usage = next(e["usage"] for e in events if e.get("usage"))
            assert usage["completion_tokens"] == 400
            finished.add(rid)
            r["told"] = usage["completion_tokens"]
        r["id"] = rid
    # Exactly the streams the killed replica held failed; every other one finished.
    assert failed == set(victim["running"]) & (failed | finished)
    assert failed and finished

    # Usage: one row per request, billed what its client was sent (nothing twice, nothing undelivered).
    deadline = time.monotonic() + 30
    while True:
        rows = {row["request_id"]: row for row in ray_server.usage_rows()}
        if all(r["id"] in rows and rows[r["id"]]["status"] != "reserved" for r in results):
            break
        assert time.monotonic() < deadline, "usage rows not settled"
        time.sleep(0.2)
    print(f"requests retried on another replica: {ray_server.serving.engine.retried}")
    for r in results:
        row = rows[r["id"]]
        assert row["completion_tokens"] == r["told"], (row, r["told"])
        assert row["status"] == ("error" if r["id"] in failed else "ok")

    # Serve replaces the dead replica; /ready counts it again and requests succeed.
    deadline = time.monotonic() + 120
    while True:
        ready = ray_server.admin.get("/ready")
        if ready.status_code == 200 and ready.json().get("engine_replicas") == REPLICAS:
            break
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.5)
    assert victim["replica"] not in replicas_view(ray_cluster)
    done = httpx.post(
        ray_server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": base, "prompt": "hi", "max_tokens": 4},
        timeout=60,
    )
    assert done.status_code == 200, done.text


def test_client_disconnect_aborts_the_request_on_its_replica(ray_server: Any, ray_cluster: Path) -> None:
    tenant = ray_server.tenant()
    key = ray_server.key(tenant["id"])
    headers = {"Authorization": f"Bearer {key}"}
    base = httpx.get(ray_server.url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    body = {"model": base, "prompt": "hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=ray_server.url, headers=headers, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        rid = sse_events(iter([first]))[0]["id"]
        assert any(rid in v["running"] for v in replicas_view(ray_cluster).values())
    # The connection is gone: the replica's engine drops the request long before its 400 tokens.
    deadline = time.monotonic() + 20
    while any(rid in v["running"] for v in replicas_view(ray_cluster).values()):
        assert time.monotonic() < deadline, "request still running on its replica"
    while True:
        row = next((x for x in ray_server.usage_rows() if x["request_id"] == rid), None)
        if row is not None and row["status"] != "reserved":
            break
        assert time.monotonic() < deadline, row
        time.sleep(0.2)
    assert row["status"] == "aborted" and row["completion_tokens"] < 400
