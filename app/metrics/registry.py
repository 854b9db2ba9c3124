"""Prometheus metrics named like vLLM's, so routers and dashboards built for vLLM read ours unchanged.

One `Metrics` per app, each with its own `CollectorRegistry` (two apps in one process, as in the tests,
never share counters). Request-level series are fed by the completion path through the hooks below;
engine gauges are read from `engine.stats()` at scrape time by `EngineCollector`. Labels are
`model_name` and low-cardinality enums only: never a tenant, key or request id (billing comes from the
usage rows, not from here).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from app.metrics.engine_collector import EngineCollector

# vLLM's buckets, so dashboards' histogram_quantile panels look the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)

TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

FINISH_REASONS = ("stop", "length", "abort", "error")


class Metrics:
    def __init__(
        self,
        model_name: str | Callable[[], str] = "",
        engine_stats: Callable[[], object | None] | None = None,
        adapter_label_key: str | None = None,
    ) -> None:
        """`model_name` may be a callable: the engine knows its name only once loaded, and the series
        are labelled from the first time it answers (an exception or "" means "not yet").
        `adapter_label_key`: when set, adapters appear in `vllm:lora_requests_info` as an HMAC of their
        name under this key, never as the name: /metrics is open to anyone who can reach it, and one
        tenant must not learn another's adapter names there."""
        self.registry = CollectorRegistry()
        self._adapter_label: Callable[[str], str] = str
        if adapter_label_key is not None:
            key = adapter_label_key.encode()
            self._adapter_label = lambda name: hmac.new(key, name.encode(), hashlib.sha256).hexdigest()[:12]
        self._name = model_name if isinstance(model_name, str) else ""
        self._name_source = None if isinstance(model_name, str) else model_name
        r, label = self.registry, ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            label,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between output tokens.",
            label,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time between output tokens (the older vLLM name).",
            label,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            label,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time a request waited before first being scheduled.",
            label,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens",
            "Prompt tokens per finished request.",
            label,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens",
            "Generated tokens per finished request.",
            label,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", label, registry=r)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", label, registry=r
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            [*label, "finished_reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "loraplex:rate_limited_requests",
            "Requests refused by a tenant limit, by limit.",
            ["reason"],
            registry=r,
        )
        self._limiter_fallback = Gauge(
            "loraplex:limiter_in_process",
            "1 while Redis is down or absent and the in-process limiter decides.",
            registry=r,
        )
        self._usage_pending = Gauge(
            "loraplex:usage_settles_pending",
            "Usage settles waiting for the database to come back.",
            registry=r,
        )
        self.usage_expired = Counter(
            "loraplex:usage_reservations_expired",
            "Reservations the sweeper expired: requests whose process died before settling.",
            registry=r,
        )
        self._engine: EngineCollector | None = None
        if self._name_source is None:
            self._label_children()
        if engine_stats is not None:
            self.bind_engine(engine_stats)

    def _label_children(self) -> None:
        # Series exist from the first scrape, so rate() and absent() work before any traffic.
        for metric in (
            self.ttft,
            self.inter_token,
            self.time_per_output_token,
            self.e2e,
            self.queue_time,
            self.request_prompt_tokens,
            self.request_generation_tokens,
        ):
            metric.labels(self.model_name)
        self.prompt_tokens.labels(self.model_name)
        self.generation_tokens.labels(self.model_name)
        for reason in FINISH_REASONS:
            self.request_success.labels(self.model_name, reason)

    @property
    def model_name(self) -> str:
        if self._name_source is not None:
            try:
                name = self._name_source()
            except Exception:
                name = ""
            if name:
                self._name, self._name_source = name, None
                self._label_children()
        return self._name

    # ---- wiring: where scrape-time values come from ----
    def bind_engine(self, stats: Callable[[], object | None], model_name: str | None = None) -> None:
        """Read engine gauges from `stats()` at every scrape; call when the engine is built. A model name
        given here labels the series from now on (the engine knows it only once loaded)."""
        if model_name and model_name != self._name:
            self._name, self._name_source = model_name, None
            self._label_children()
        if self._engine is None:
            self._engine = EngineCollector(stats, lambda: self.model_name, self._adapter_label)
            self.registry.register(self._engine)
        else:
            self._engine.stats = stats

    def bind_limiter(self, limiter: Any) -> None:
        self._limiter_fallback.set_function(lambda: float(limiter.backend == "memory"))

    def bind_metering(self, metering: Any) -> None:
        self._usage_pending.set_function(lambda: float(metering.pending))

    # ---- hooks called by the completion path ----
    def first_token(self, ttft_s: float) -> None:
        self.ttft.labels(self.model_name).observe(max(0.0, ttft_s))

    def output_tokens(self, gap_s: float, num_tokens: int = 1) -> None:
        """A chunk of `num_tokens` tokens arrived `gap_s` after the previous one (not for the first token)."""
        if num_tokens <= 0:
            return
        per_token = max(0.0, gap_s) / num_tokens
        for _ in range(num_tokens):
            self.inter_token.labels(self.model_name).observe(per_token)
            self.time_per_output_token.labels(self.model_name).observe(per_token)

    def request_finished(
        self,
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        e2e_s: float | None,
        queue_s: float | None = None,
    ) -> None:
        reason = finish_reason if finish_reason in FINISH_REASONS else "error"
        self.request_success.labels(self.model_name, reason).inc()
        self.prompt_tokens.labels(self.model_name).inc(max(0, prompt_tokens))
        self.generation_tokens.labels(self.model_name).inc(max(0, completion_tokens))
        self.request_prompt_tokens.labels(self.model_name).observe(max(0, prompt_tokens))
        self.request_generation_tokens.labels(self.model_name).observe(max(0, completion_tokens))
        if e2e_s is not None:
            self.e2e.labels(self.model_name).observe(max(0.0, e2e_s))
        if queue_s is not None:
            self.queue_time.labels(self.model_name).observe(max(0.0, queue_s))

    def request_rate_limited(self, reason: str | None) -> None:
        self.rate_limited.labels(reason or "unknown").inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        _ = self.model_name  # labels the series as soon as the engine knows its name
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
