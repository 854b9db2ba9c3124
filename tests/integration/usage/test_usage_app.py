"""The usage services inside a running app: /metrics in Prometheus format without tenant or key labels,
the limiter on Redis and on its in-process fallback (Redis absent or on a dead port: no 500, /health 200),
and a sweep started by the app's lifespan."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.domain.usage.lifespan import limiter_of, metering_of, metrics_of
from app.limits import TenantLimits
from tests.integration.conftest import free_port

FORBIDDEN_LABELS = {"tenant", "tenant_id", "tenant_name", "key", "key_id", "api_key", "user", "request_id"}


def scrape(client: TestClient) -> tuple[str, dict[str, float]]:  # type: ignore[type-arg]
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            assert not FORBIDDEN_LABELS & set(s.labels), (s.name, s.labels)
            values[s.name] = s.value
    return r.text, values


def test_metrics_have_vllm_names_and_no_tenant_labels(client, make_tenant, make_key) -> None:  # type: ignore[no-untyped-def]
    tenant = make_tenant(name="metrics-tenant", max_concurrent_requests=1)
    key = make_key(tenant["id"])
    app = client.app
    limiter = limiter_of(app)

    class Row:
        id = tenant["id"]
        requests_per_minute = None
        tokens_per_minute = None
        max_concurrent_requests = 1
        monthly_token_quota = None

    first = client.blocking_portal.call(limiter.admit, Row(), 5)
    refused = client.blocking_portal.call(limiter.admit, Row(), 5)
    assert first.allowed and not refused.allowed
    metrics = metrics_of(app)
    metrics.request_rate_limited(refused.reason)
    metrics.first_token(0.02)
    metrics.output_tokens(0.03, 2)
    metrics.request_finished("stop", 7, 3, 0.2, 0.001)

    text, values = scrape(client)
    for name in (
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:time_per_output_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "loraplex:rate_limited_requests_total",
        "loraplex:usage_settles_pending",
    ):
        assert name in values, name
    assert values["vllm:prompt_tokens_total"] == 7
    assert values["loraplex:limiter_in_process"] == 1  # no LORAPLEX_REDIS_URL in this app
    for secret in (tenant["id"], tenant["name"], key, key[:12]):
        assert secret not in text
    # /metrics needs no key (Prometheus scrapes it) and tells nothing per tenant.
    assert client.get("/metrics", headers={"Authorization": "Bearer nonsense"}).status_code == 200


def test_engine_stats_bound_by_the_serving_side(client) -> None:  # type: ignore[no-untyped-def]
    running = ["acme-secret-bot@1", "acme-secret-bot@1", "globex-bot@2"]
    stats: dict[str, object] = {
        "num_running": 3,
        "num_waiting": 1,
        "kv_cache_usage": 0.5,
        "running_adapters": running,
        "max_loras": 4,
    }
    metrics_of(client.app).bind_engine(lambda: stats, "demo-model")
    text, values = scrape(client)
    assert values["vllm:num_requests_running"] == 3 and values["vllm:kv_cache_usage_perc"] == 0.5
    assert 'vllm:num_requests_running{model_name="demo-model"}' in text
    # /metrics needs no key: tenants' adapter names appear only as opaque ids, one per adapter.
    assert "acme" not in text and "globex" not in text
    info = next(f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info")
    ids = info.samples[0].labels["running_lora_adapters"].split(",")
    assert len(ids) == 2 and all(len(i) == 12 for i in ids)
    stats["num_running"] = 0
    assert scrape(client)[1]["vllm:num_requests_running"] == 0


def test_app_on_real_redis_uses_it(build_app, redis_url) -> None:  # type: ignore[no-untyped-def]
    app = build_app(redis_url=redis_url, redis_key_prefix=f"lpxapp{uuid.uuid4().hex[:6]}")
    with TestClient(app) as client:
        limiter = limiter_of(app)
        assert limiter.backend == "redis"
        assert client.blocking_portal.call(limiter.ping)
        assert scrape(client)[1]["loraplex:limiter_in_process"] == 0


def test_app_with_redis_on_a_dead_port_still_serves(build_app) -> None:  # type: ignore[no-untyped-def]
    app = build_app(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        limiter = limiter_of(app)

        class Row:
            id = str(uuid.uuid4())
            requests_per_minute = 2
            tokens_per_minute = None
            max_concurrent_requests = None
            monthly_token_quota = None

        results = [client.blocking_portal.call(limiter.admit, Row(), 1) for _ in range(3)]
        assert [a.allowed for a in results] == [True, True, False]
        assert {a.backend for a in results} == {"memory"}
        assert results[2].retry_after_header["retry-after"] == "30"
        assert scrape(client)[1]["loraplex:limiter_in_process"] == 1
        assert client.get("/health").status_code == 200


def test_lifespan_metering_is_wired_to_the_apps_database(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    tenant = make_tenant()
    metering = metering_of(client.app)
    portal = client.blocking_portal
    portal.call(metering.reserve, "req-1", tenant["id"], None, None, None, "base", 4, 8)
    assert portal.call(metering.settle, "req-1", 4, 0, 2, "stop", "ok")
    assert portal.call(metering.month_tokens, tenant["id"], datetime.now(UTC).strftime("%Y%m")) == 6


def test_the_apps_sweeper_expires_a_dead_processs_reservation(build_app, admin_headers, redis_url) -> None:  # type: ignore[no-untyped-def]
    import time

    from sqlalchemy import select, update

    from app.db.session import session_maker
    from app.domain.usage.models import UsageRecord

    prefix = f"lpxsweep{uuid.uuid4().hex[:6]}"
    app = build_app(usage_sweep_interval_seconds=0.1, redis_url=redis_url, redis_key_prefix=prefix)
    with TestClient(app) as client:
        tenant = client.post(
            "/admin/tenants", json={"name": "sweepme", "monthly_token_quota": 100}, headers=admin_headers
        ).json()
        portal = client.blocking_portal
        limits = TenantLimits(tenant["id"], monthly_token_quota=100)
        # The "dead process": admitted (80 of the month's 100 tokens) and reserved, never settled.
        assert portal.call(limiter_of(app).admit, limits, 80).allowed
        portal.call(metering_of(app).reserve, "orphan", tenant["id"], None, None, None, "base", 40, 40)
        assert not portal.call(limiter_of(app).admit, limits, 30).allowed
        portal.call(metering_of(app).reserve, "alive", tenant["id"], None, None, None, "base", 4, 8)

        async def age_and_read(request_id: str, age: bool) -> str:
            async with session_maker(app)() as session:
                if age:
                    old = datetime.now(UTC) - timedelta(hours=1)
                    await session.execute(
                        update(UsageRecord).where(UsageRecord.request_id == request_id).values(created_at=old)
                    )
                    await session.commit()
                query = select(UsageRecord.status).where(UsageRecord.request_id == request_id)
                return str((await session.execute(query)).scalar_one())

        portal.call(age_and_read, "orphan", True)
        deadline = time.monotonic() + 5
        while portal.call(age_and_read, "orphan", False) != "expired" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert portal.call(age_and_read, "orphan", False) == "expired"
        assert portal.call(age_and_read, "alive", False) == "reserved"
        # The sweeper gave the dead request's 80 tokens back to the month's counter in Redis.
        assert portal.call(limiter_of(app).admit, limits, 30).allowed
        assert scrape(client)[1]["loraplex:usage_reservations_expired_total"] == 1
