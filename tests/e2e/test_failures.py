"""What happens when things go wrong: a client leaving mid-stream, and the engine dying under requests.

The engine-death test breaks this module's server for good, so it runs last here and has the module's
server to itself.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import LiveServer, error_of, start_server

LONG = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def row_of(server: LiveServer, request_id: str) -> dict[str, Any] | None:
    return next((r for r in server.usage_rows() if r["request_id"] == request_id), None)


def test_disconnect_mid_stream_aborts_the_engine_request_and_settles_usage(live_server: LiveServer) -> None:
    tenant = live_server.tenant(max_concurrent_requests=1)
    headers = {"Authorization": f"Bearer {live_server.key(tenant['id'])}"}
    body = {"model": "demo-model", "stream": True, **LONG}
    with httpx.stream(
        "POST", live_server.url + "/v1/completions", json=body, headers=headers, timeout=30
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept referenced: a collected line iterator closes the connection
        first = next(line for line in lines if line.startswith("data: {"))
        request_id = json.loads(first[6:])["id"]
        assert live_server.serving.engine.stats().running == 1
        r.close()
    # The client is gone: the engine request is aborted and its usage settled, exactly once.
    wait_for(lambda: live_server.serving.engine.stats().running == 0)
    wait_for(lambda: (row_of(live_server, request_id) or {}).get("status") == "aborted")
    row = row_of(live_server, request_id)
    assert row is not None and 0 < row["completion_tokens"] < 400
    assert [r["request_id"] for r in live_server.usage_rows()].count(request_id) == 1
    # Its concurrency slot came back: the tenant's one allowed request goes through.
    ok = httpx.post(
        live_server.url + "/v1/completions",
        json={"model": "demo-model", "prompt": "hi", "max_tokens": 2},
        headers=headers,
        timeout=30,
    )
    assert ok.status_code == 200, ok.text


def test_disconnect_while_waiting_for_a_whole_answer_aborts_too(live_server: LiveServer) -> None:
    tenant = live_server.tenant()
    headers = {"Authorization": f"Bearer {live_server.key(tenant['id'])}"}
    # 500 decode steps take seconds on a CPU; the client gives up after 0.3 s.
    body = {"model": "demo-model", "n": 4, **LONG, "max_tokens": 500}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            live_server.url + "/v1/completions",
            json=body,
            headers=headers,
            timeout=httpx.Timeout(30, read=0.3),
        )

    def settled() -> list[dict[str, Any]]:
        return [r for r in live_server.usage_rows() if str(r["tenant_id"]) == tenant["id"]]

    wait_for(lambda: live_server.serving.engine.stats().running == 0)
    wait_for(lambda: [r["status"] for r in settled()] == ["aborted"])
    assert 0 < settled()[0]["completion_tokens"] < 4 * 500


def test_concurrency_limit_is_a_429_with_retry_headers(live_server: LiveServer) -> None:
    tenant = live_server.tenant(max_concurrent_requests=1)
    key = live_server.key(tenant["id"])
    body = {"model": "demo-model", "stream": True, **LONG}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", live_server.url + "/v1/completions", json=body, headers=headers, timeout=30
    ) as r:
        lines = r.iter_lines()  # kept referenced: a collected line iterator closes the connection
        next(line for line in lines if line.startswith("data: {"))
        with pytest.raises(openai.RateLimitError) as err:
            live_server.openai(key).completions.create(model="demo-model", prompt="hi", max_tokens=2)
        assert err.value.status_code == 429
        assert error_of(err.value)["code"] == "rate_limit_exceeded"
        assert int(err.value.response.headers["retry-after"]) >= 1


def test_rate_limit_headers_on_answers_and_streams(live_server: LiveServer) -> None:
    tenant = live_server.tenant(requests_per_minute=100, tokens_per_minute=10_000)
    client = live_server.openai(live_server.key(tenant["id"]))
    raw = client.completions.with_raw_response.create(model="demo-model", prompt="hi", max_tokens=2)
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
    with client.completions.with_streaming_response.create(
        model="demo-model", prompt="hi", max_tokens=2, stream=True
    ) as streamed:
        assert streamed.headers["x-ratelimit-remaining-requests"] == "98"
        assert streamed.headers["content-type"].startswith("text/event-stream")


def test_fifty_concurrent_requests_against_a_limit_of_five_admit_exactly_five(
    live_server: LiveServer,
) -> None:
    tenant = live_server.tenant(max_concurrent_requests=5)
    headers = {"Authorization": f"Bearer {live_server.key(tenant['id'])}"}
    # Each admitted request runs for seconds (8 x 500 tokens), far longer than 50 admissions take.
    body = {"model": "demo-model", "stream": True, "n": 8, **LONG, "max_tokens": 500}
    statuses: list[int] = []
    everyone_answered = threading.Barrier(50, timeout=60)

    def call() -> None:
        with httpx.stream(
            "POST", live_server.url + "/v1/completions", json=body, headers=headers, timeout=60
        ) as r:
            statuses.append(r.status_code)
            # Hold admitted streams open until all 50 have their answer, so no slot frees up early.
            everyone_answered.wait()

    threads = [threading.Thread(target=call) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert sorted(statuses).count(200) == 5 and statuses.count(429) == 45
    wait_for(lambda: live_server.serving.engine.stats().running == 0)
    # The five were cut off by their clients: five usage rows, all settled.
    wait_for(lambda: sorted(r["status"] for r in _rows_of(live_server, tenant["id"])) == ["aborted"] * 5)


def _rows_of(server: LiveServer, tenant_id: str) -> list[dict[str, Any]]:
    return [r for r in server.usage_rows() if str(r["tenant_id"]) == tenant_id]


def test_engine_death_turns_in_flight_requests_and_ready_into_503(live_server: LiveServer) -> None:
    tenant = live_server.tenant()
    key = live_server.key(tenant["id"])
    client = live_server.openai(key)
    results: dict[str, Any] = {}

    def non_streaming() -> None:
        try:
            client.completions.create(model="demo-model", extra_body={"ignore_eos": True}, **_sdk(LONG))
        except openai.APIStatusError as exc:
            results["plain"] = exc

    def streaming() -> None:
        try:
            for _ in client.completions.create(
                model="demo-model", stream=True, extra_body={"ignore_eos": True}, **_sdk(LONG)
            ):
                results.setdefault("first_chunk", True)
        except openai.APIError as exc:
            results["stream"] = exc

    rows_before = {r["request_id"] for r in live_server.usage_rows()}
    threads = [threading.Thread(target=non_streaming), threading.Thread(target=streaming)]
    for t in threads:
        t.start()
    wait_for(lambda: live_server.serving.engine.stats().running == 2 and "first_chunk" in results)

    engine = live_server.serving.engine._engine.engine

    def broken(*_: Any, **__: Any) -> Any:
        # An accelerator error: the engine's own fault, never blamed on a request.
        raise RuntimeError("CUDA error: injected fault: the GPU fell off the bus")

    engine.runner.execute = broken
    for t in threads:
        t.join(timeout=30)
    assert isinstance(results.get("plain"), openai.InternalServerError)
    assert results["plain"].status_code == 503
    # The fault's text goes to the log, never to a client (issue 13).
    assert "injected fault" not in results["plain"].message
    assert error_of(results["plain"])["code"] == "engine_unavailable"
    # The stream had started (status 200 sent): the failure arrives as an error event.
    assert isinstance(results.get("stream"), openai.APIError)
    assert "failed while generating" in str(results["stream"]) and "injected fault" not in str(
        results["stream"]
    )

    ready = live_server.admin.get("/ready")
    assert ready.status_code == 503 and "engine dead" in ready.json()["checks"]["engine"]
    assert live_server.admin.get("/health").status_code == 200
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="demo-model", prompt="hi", max_tokens=2)
    assert err.value.status_code == 503
    # Both failed requests were settled once, as errors; the refused one never got a row.
    new_rows = [r for r in live_server.usage_rows() if r["request_id"] not in rows_before]
    assert sorted(r["status"] for r in new_rows) == ["error", "error"]
    assert all(str(r["tenant_id"]) == tenant["id"] for r in new_rows)


def _sdk(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "ignore_eos"}


def test_a_model_that_cannot_load_keeps_the_server_up_but_not_ready(
    demo_model: Path, module_database: str, tmp_path: Path
) -> None:
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    server = start_server(demo_model, tmp_path / "data", module_database, until=503, model=str(broken))
    try:
        ready = server.admin.get("/ready")
        assert ready.status_code == 503 and "model failed to load" in ready.json()["checks"]["engine"]
        assert server.admin.get("/health").status_code == 200
        tenant = server.tenant()
        with pytest.raises(openai.InternalServerError) as err:
            server.openai(server.key(tenant["id"])).completions.create(
                model="demo-model", prompt="hi", max_tokens=2
            )
        assert err.value.status_code == 503 and error_of(err.value)["code"] == "engine_unavailable"
    finally:
        server.stop()
