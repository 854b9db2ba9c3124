"""Engine gauges and counters read from `AsyncLLMEngine.stats()` at scrape time (nothing is cached here).

`stats()` may return a dataclass-like object or a mapping; the fields read are listed in docs/internals.md
("App seams: limits and metering"). A field the engine does not report is simply not exported, and a
failing `stats()` (engine dead or not started) exports no engine series rather than failing `/metrics`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


def field(stats: Any, *names: str) -> Any:
    """The first of `names` that `stats` carries, as attribute or key; None if none."""
    for name in names:
        if isinstance(stats, Mapping):
            if name in stats:
                return stats[name]
        elif hasattr(stats, name):
            return getattr(stats, name)
    return None


class EngineCollector(Collector):
    def __init__(
        self,
        stats: Callable[[], object | None],
        model_name: Callable[[], str],
        adapter_label: Callable[[str], str] = str,
    ) -> None:
        self.stats = stats
        self._model_name = model_name
        self._adapter_label = adapter_label

    @property
    def _model(self) -> str:
        return self._model_name()

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.stats()
        except Exception:
            log.warning("engine stats unavailable for /metrics", exc_info=True)
            return
        if stats is None:
            return
        yield from self._gauges(stats)
        yield from self._prefix_cache(stats)
        yield from self._adapters(stats)
        yield from self._spec_decode(stats)

    def _gauge(self, name: str, doc: str, value: Any) -> Iterator[Metric]:
        if value is None:
            return
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self._model], float(value))
        yield family

    def _counter(self, name: str, doc: str, value: Any) -> Iterator[Metric]:
        if value is None:
            return
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([self._model], float(value))
        yield family

    def _labels(self, names: Any) -> list[str] | None:
        return None if names is None else sorted({self._adapter_label(str(n)) for n in names})

    def _gauges(self, stats: Any) -> Iterator[Metric]:
        yield from self._gauge(
            "vllm:num_requests_running",
            "Requests in the running batch.",
            field(stats, "num_running", "running"),
        )
        yield from self._gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled.",
            field(stats, "num_waiting", "waiting"),
        )
        usage = field(stats, "kv_cache_usage", "kv_usage", "gpu_cache_usage")
        yield from self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", usage)
        yield from self._gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (the older vLLM name).", usage)

    def _prefix_cache(self, stats: Any) -> Iterator[Metric]:
        queries = field(stats, "prefix_cache_queries", "prefix_queried_tokens")
        hits = field(stats, "prefix_cache_hits", "prefix_hit_tokens")
        yield from self._counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries
        )
        yield from self._counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        rate = field(stats, "prefix_cache_hit_rate", "prefix_hit_rate")
        if rate is None and queries:
            rate = float(hits or 0) / float(queries)
        yield from self._gauge("vllm:gpu_prefix_cache_hit_rate", "Prefix-cache hit rate (tokens).", rate)

    def _adapters(self, stats: Any) -> Iterator[Metric]:
        running = self._labels(field(stats, "running_adapters", "running_lora_adapters"))
        waiting = self._labels(field(stats, "waiting_adapters", "waiting_lora_adapters"))
        cache = field(stats, "adapter_cache", "adapter_cache_stats")
        # The adapter cache's GPU slot count is max_loras when the engine does not report it apart.
        max_lora = field(stats, "max_loras", "max_lora")
        if max_lora is None and cache is not None:
            max_lora = field(cache, "slots")
        if running is not None or waiting is not None:
            info = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Adapters of running and waiting requests; the value is the time of this reading.",
                labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )
            info.add_metric(
                [
                    str(int(max_lora or 0)),
                    ",".join(sorted(set(running or ()))),
                    ",".join(sorted(set(waiting or ()))),
                ],
                time.time(),
            )
            yield info
        if cache is None:
            return
        for key, name, doc in (
            ("hits", "loraplex:adapter_cache_hits", "Adapter lookups served by a resident GPU slot."),
            ("misses", "loraplex:adapter_cache_misses", "Adapter lookups that had to load."),
            ("loads", "loraplex:adapter_cache_loads", "Adapters loaded into a GPU slot."),
            ("load_seconds", "loraplex:adapter_load_seconds", "Seconds spent loading adapters."),
            ("load_failures", "loraplex:adapter_load_failures", "Adapter loads that failed."),
        ):
            yield from self._counter(name, doc, field(cache, key))
        for key, name, doc in (
            ("gpu_resident", "loraplex:adapters_gpu_resident", "Adapters resident in GPU slots."),
            ("cpu_resident", "loraplex:adapters_cpu_resident", "Adapters resident in the CPU tier."),
        ):
            yield from self._gauge(name, doc, field(cache, key))

    def _spec_decode(self, stats: Any) -> Iterator[Metric]:
        """Speculative decoding counters under vLLM's names (absent while speculation is off)."""
        spec = field(stats, "spec_decode")
        if not spec:
            return
        for key, name, doc in (
            ("num_drafts", "vllm:spec_decode_num_drafts", "Sequences x steps that verified drafted tokens."),
            ("num_draft_tokens", "vllm:spec_decode_num_draft_tokens", "Drafted tokens verified."),
            ("num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens", "Drafted tokens accepted."),
        ):
            yield from self._counter(name, doc, field(spec, key))
        per_pos = field(spec, "accepted_per_pos")
        if per_pos is not None:
            family = CounterMetricFamily(
                "vllm:spec_decode_num_accepted_tokens_per_pos",
                "Drafts whose token at this position was accepted.",
                labels=["model_name", "position"],
            )
            for position, count in enumerate(per_pos):
                family.add_metric([self._model, str(position)], float(count))
            yield family
