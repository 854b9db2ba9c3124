"""Each engine replica's metrics, exported through Ray's metrics system.

`ray.serve.metrics` gauges carry the `deployment`, `replica` and `application` tags on their own, and every
Ray node's metrics agent serves them to Prometheus (names prefixed `ray_`), so no replica needs its own
port: docs/scale-out.md, "Metrics". Adapter residency is a count per tier (GPU slots, CPU tier) and per
replica, never an adapter or tenant label (cardinality; DESIGN.md's metrics invariant).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ray.serve import metrics


class ReplicaMetrics:
    def __init__(self) -> None:
        self.loads_by_adapter: Counter[str] = Counter()  # Serve loader calls (cold loads) per content hash
        self.adapter_requests = 0
        self.running = metrics.Gauge("loraplex_engine_requests_running", "Requests in the running batch.")
        self.waiting = metrics.Gauge("loraplex_engine_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = metrics.Gauge("loraplex_engine_kv_cache_usage", "KV-cache usage; 1 = full.")
        self.resident = metrics.Gauge(
            "loraplex_engine_adapters_resident",
            "Adapters resident on this replica, by tier (gpu slots, cpu cache, serve = Serve's routing view).",
            tag_keys=("tier",),
        )
        self.adapter_loads = metrics.Gauge(
            "loraplex_engine_adapter_loads", "Adapters loaded by this replica since it started."
        )

    def observe(self, engine: Any, serve_resident: int) -> None:
        stats = engine.stats()
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_usage)
        cache = engine.engine.adapter_cache
        self.resident.set(len(cache.gpu_order()), tags={"tier": "gpu"})
        self.resident.set(len(cache.cpu_order()), tags={"tier": "cpu"})
        self.resident.set(serve_resident, tags={"tier": "serve"})
        self.adapter_loads.set(sum(self.loads_by_adapter.values()))
