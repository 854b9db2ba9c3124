"""Limits, metering and metrics around real completions (demo model on CPU, real PostgreSQL and Redis):
headers and 429 over HTTP, the bill equal to the usage objects returned, /metrics fed by the engine."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.domain.usage.lifespan import limiter_of


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("usage-demo") / "demo-model")


def _wait_ready(client: TestClient, timeout: float = 120.0) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError(client.get("/ready").text)


def test_limits_bill_and_metrics_around_real_completions(  # type: ignore[no-untyped-def]
    build_app, admin_headers, redis_url, demo_model
) -> None:
    app = build_app(
        model=str(demo_model),
        device="cpu",
        max_model_len=256,
        kv_cache_bytes=4 << 20,
        redis_url=redis_url,
        redis_key_prefix=f"lpxserved{uuid.uuid4().hex[:6]}",
    )
    with TestClient(app, timeout=60) as client:
        _wait_ready(client)
        tenant = client.post(
            "/admin/tenants",
            json={"name": "served", "requests_per_minute": 2, "tokens_per_minute": 5000},
            headers=admin_headers,
        ).json()
        key = client.post(
            f"/admin/tenants/{tenant['id']}/api-keys", json={"scopes": ["completions"]}, headers=admin_headers
        ).json()["key"]
        auth = {"Authorization": f"Bearer {key}"}
        model = client.get("/v1/models", headers=auth).json()["data"][0]["id"]
        body = {"model": model, "prompt": "the quick brown fox", "max_tokens": 5, "temperature": 0}

        usages = []
        for remaining in ("1", "0"):
            r = client.post("/v1/completions", json=body, headers=auth)
            assert r.status_code == 200, r.text
            assert r.headers["x-ratelimit-limit-requests"] == "2"
            assert r.headers["x-ratelimit-remaining-requests"] == remaining
            assert r.headers["x-ratelimit-limit-tokens"] == "5000"
            usages.append(r.json()["usage"])
        refused = client.post("/v1/completions", json=body, headers=auth)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert (
            int(refused.headers["retry-after"]) == 30
            and refused.headers["x-ratelimit-remaining-requests"] == "0"
        )
        # Both concurrency slots came back and the unused tokens were refunded.
        assert client.blocking_portal.call(limiter_of(app).running, tenant["id"]) == 0

        bill = client.get("/v1/usage", params={"group_by": "tenant"}, headers=auth).json()
        assert bill["totals"]["requests"] == 2
        for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert bill["totals"][field] == sum(u[field] for u in usages), field

        text = client.get("/metrics").text
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                values[(s.name, tuple(sorted(s.labels.items())))] = s.value
        lbl = (("model_name", model),)
        assert values[("vllm:prompt_tokens_total", lbl)] == sum(u["prompt_tokens"] for u in usages)
        assert values[("vllm:generation_tokens_total", lbl)] == sum(u["completion_tokens"] for u in usages)
        assert values[("vllm:time_to_first_token_seconds_count", lbl)] == 2
        assert values[("vllm:e2e_request_latency_seconds_count", lbl)] == 2
        assert values[("vllm:num_requests_running", lbl)] == 0
        assert ("vllm:kv_cache_usage_perc", lbl) in values
        assert values[("loraplex:rate_limited_requests_total", (("reason", "requests"),))] == 1
        assert values[("loraplex:limiter_in_process", ())] == 0
        assert tenant["id"] not in text and key not in text


def test_postgres_gone_new_requests_and_billing_503_health_200(  # type: ignore[no-untyped-def]
    build_app, admin_headers, demo_model, migrated_database_url
) -> None:
    import asyncio

    from tests.integration.usage.usage_db import rename_database

    name = migrated_database_url.rsplit("/", 1)[1]
    app = build_app(model=str(demo_model), device="cpu", max_model_len=256, kv_cache_bytes=4 << 20)
    with TestClient(app, timeout=60) as client:
        _wait_ready(client)
        tenant = client.post("/admin/tenants", json={"name": "pgdown"}, headers=admin_headers).json()
        key = client.post(
            f"/admin/tenants/{tenant['id']}/api-keys", json={"scopes": ["completions"]}, headers=admin_headers
        ).json()["key"]
        auth = {"Authorization": f"Bearer {key}"}
        model = client.get("/v1/models", headers=auth).json()["data"][0]["id"]
        body = {"model": model, "prompt": "hello there", "max_tokens": 3, "temperature": 0}
        assert client.post("/v1/completions", json=body, headers=auth).status_code == 200

        asyncio.run(rename_database(name, name + "_gone"))
        try:
            r = client.post("/v1/completions", json=body, headers=auth)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "database_unavailable" and r.headers["retry-after"] == "1"
            billing = client.get("/admin/usage", headers=admin_headers)
            assert billing.status_code == 503 and billing.json()["error"]["code"] == "database_unavailable"
            assert client.get("/health").status_code == 200
        finally:
            asyncio.run(rename_database(name + "_gone", name))
        deadline = time.monotonic() + 10
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        bill = client.get("/v1/usage", params={"group_by": "tenant"}, headers=auth).json()
        assert bill["totals"]["requests"] == 1


def test_redis_down_completions_still_limited_in_process(build_app, admin_headers, demo_model) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.conftest import free_port

    app = build_app(
        model=str(demo_model),
        device="cpu",
        max_model_len=256,
        kv_cache_bytes=4 << 20,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    with TestClient(app, timeout=60) as client:
        _wait_ready(client)
        tenant = client.post(
            "/admin/tenants", json={"name": "noredis", "requests_per_minute": 1}, headers=admin_headers
        ).json()
        key = client.post(
            f"/admin/tenants/{tenant['id']}/api-keys", json={"scopes": ["completions"]}, headers=admin_headers
        ).json()["key"]
        auth = {"Authorization": f"Bearer {key}"}
        model = client.get("/v1/models", headers=auth).json()["data"][0]["id"]
        body = {"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0}
        first = client.post("/v1/completions", json=body, headers=auth)
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-requests"] == "0"
        second = client.post("/v1/completions", json=body, headers=auth)
        assert second.status_code == 429 and int(second.headers["retry-after"]) == 60
        assert client.get("/health").status_code == 200
        assert "loraplex:limiter_in_process 1.0" in client.get("/metrics").text
