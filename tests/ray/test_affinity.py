"""Adapter-aware routing: 200 requests over 8 adapters on 2 replicas of 4 GPU slots each. After warm-up,
>= 90% of adapter requests land on a replica already holding their adapter, no adapter is loaded more
often than there are replicas, and each replica's Serve cache equals its engine's GPU slots."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.ray.conftest import METRICS_PORT, REPLICAS, replicas_view

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ADAPTERS = 8
REQUESTS = 200
CONCURRENCY = 8
SLOTS = Settings().max_loras  # GPU adapter slots per replica = Serve's max_num_models_per_replica


def write_adapters(demo_model: Path, out: Path, first: int = 0) -> list[Path]:
    from engine.demo import DEMO_ADAPTERS, write_adapter

    cfg = json.loads((demo_model / "config.json").read_text())
    specs = list(DEMO_ADAPTERS.values())
    return [write_adapter(out / f"a{i}", cfg, seed=100 + i, **specs[i % len(specs)]) for i in range(ADAPTERS)]


async def run(url: str, key: str, models: list[str]) -> list[int]:
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:

        async def one(model: str) -> int:
            async with sem:
                body = {"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0.0}
                return (await c.post("/v1/completions", json=body)).status_code

        return list(await asyncio.gather(*(one(m) for m in models)))


def test_requests_find_the_replica_holding_their_adapter(
    ray_server: Any, ray_cluster: Path, tmp_path: Path
) -> None:
    tenant = ray_server.tenant()
    key = ray_server.key(tenant["id"])
    names, hashes = [], []
    for i, folder in enumerate(write_adapters(ray_server.demo_model, tmp_path)):
        row = ray_server.upload(tenant["id"], f"ad{i}", folder)
        names.append(f"ad{i}")
        hashes.append(row["sha256"])
    # Warm-up: each adapter once, one at a time (Serve sends an unknown id to the replica holding fewest).
    for name in names:
        assert asyncio.run(run(ray_server.url, key, [name])) == [200]
    before = replicas_view(ray_cluster)
    assert len(before) == REPLICAS

    rng = random.Random(7)
    models = [rng.choice(names) for _ in range(REQUESTS)]
    assert asyncio.run(run(ray_server.url, key, models)) == [200] * REQUESTS
    after = replicas_view(ray_cluster)
    assert set(after) == set(before)

    served = sum(after[r]["adapter_requests"] - before[r]["adapter_requests"] for r in after)
    assert served == REQUESTS
    loads_in_run = sum(
        after[r]["loads"].get(h, 0) - before[r]["loads"].get(h, 0) for r in after for h in hashes
    )
    # A request whose replica had to load its adapter is a miss; the rest found it resident.
    assert (REQUESTS - loads_in_run) / REQUESTS >= 0.90, loads_in_run
    for h in hashes:
        assert sum(after[r]["loads"].get(h, 0) for r in after) <= REPLICAS, (h, after)
    # One truth for residency: what Serve routes by is what the engine holds in its GPU slots.
    for info in after.values():
        assert set(info["serve"]) == set(info["engine_gpu"]), info

    # Past the slots: 4 more adapters make Serve evict; each eviction leaves the engine's slots too.
    for i, folder in enumerate(write_adapters(ray_server.demo_model, tmp_path / "more", first=ADAPTERS)):
        ray_server.upload(tenant["id"], f"more{i}", folder)
        assert asyncio.run(run(ray_server.url, key, [f"more{i}"])) == [200]
    evicted = replicas_view(ray_cluster)
    assert sum(len(set(hashes) - set(info["serve"])) for info in evicted.values()) > 0
    for info in evicted.values():
        assert len(info["serve"]) <= SLOTS and set(info["serve"]) == set(info["engine_gpu"]), info

    # Each replica's residency reaches Prometheus through Ray's metrics export, labelled by replica.
    resident = scrape_resident(len(evicted))
    for replica, info in evicted.items():
        assert resident[(replica, "gpu")] == len(info["engine_gpu"]) > 0, resident


def scrape_resident(replicas: int, timeout_s: float = 30.0) -> dict[tuple[str, str], float]:
    """ray_loraplex_engine_adapters_resident samples by (replica, tier), once every replica reported."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        found = {
            (sample.labels.get("replica", ""), sample.labels.get("tier", "")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "ray_loraplex_engine_adapters_resident"
        }
        if len({r for r, _ in found}) >= replicas and all(v > 0 for (_, t), v in found.items() if t == "gpu"):
            return found
        assert time.monotonic() < deadline, sorted(found.items())
        time.sleep(1.0)
