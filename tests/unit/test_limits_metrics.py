"""Metrics: vLLM's names in the exposition, per-app registries, engine stats read at scrape time."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from app.metrics import Metrics


@dataclass
class Stats:
    num_running: int = 3
    num_waiting: int = 2
    kv_cache_usage: float = 0.25
    prefix_cache_queries: int = 200
    prefix_cache_hits: int = 50
    running_adapters: list[str] = field(default_factory=lambda: ["b", "a"])
    waiting_adapters: list[str] = field(default_factory=lambda: ["c"])
    max_loras: int = 4
    adapter_cache: dict[str, float] = field(
        default_factory=lambda: {"hits": 7, "misses": 2, "loads": 2, "load_seconds": 0.5, "gpu_resident": 2}
    )


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_request_hooks_feed_vllm_series() -> None:
    m = Metrics("demo")
    m.first_token(0.03)
    m.output_tokens(0.2, 4)
    m.request_finished("stop", prompt_tokens=11, completion_tokens=5, e2e_s=0.4, queue_s=0.01)
    m.request_finished("weird", prompt_tokens=1, completion_tokens=0, e2e_s=None)
    m.request_rate_limited("tokens")
    got = samples(m)
    lbl = (("model_name", "demo"),)
    assert got[("vllm:prompt_tokens_total", lbl)] == 12
    assert got[("vllm:generation_tokens_total", lbl)] == 5
    assert got[("vllm:time_to_first_token_seconds_count", lbl)] == 1
    assert got[("vllm:inter_token_latency_seconds_count", lbl)] == 4
    assert got[("vllm:inter_token_latency_seconds_sum", lbl)] == 0.2
    assert got[("vllm:time_per_output_token_seconds_count", lbl)] == 4
    assert got[("vllm:e2e_request_latency_seconds_count", lbl)] == 1
    assert got[("vllm:request_queue_time_seconds_count", lbl)] == 1
    assert got[("vllm:request_prompt_tokens_sum", lbl)] == 12
    assert got[("vllm:request_generation_tokens_bucket", (("le", "5.0"), *lbl))] == 2
    assert got[("vllm:request_success_total", (("finished_reason", "stop"), *lbl))] == 1
    assert got[("vllm:request_success_total", (("finished_reason", "error"), *lbl))] == 1
    assert got[("loraplex:rate_limited_requests_total", (("reason", "tokens"),))] == 1


def test_each_app_has_its_own_registry() -> None:
    a, b = Metrics("demo"), Metrics("demo")
    a.request_finished("stop", 3, 3, 0.1)
    assert samples(a)[("vllm:prompt_tokens_total", (("model_name", "demo"),))] == 3
    assert samples(b)[("vllm:prompt_tokens_total", (("model_name", "demo"),))] == 0


def test_engine_stats_read_at_scrape_time() -> None:
    stats = Stats()
    m = Metrics("demo", engine_stats=lambda: stats)
    lbl = (("model_name", "demo"),)
    got = samples(m)
    assert got[("vllm:num_requests_running", lbl)] == 3
    assert got[("vllm:num_requests_waiting", lbl)] == 2
    assert got[("vllm:kv_cache_usage_perc", lbl)] == 0.25
    assert got[("vllm:gpu_cache_usage_perc", lbl)] == 0.25
    assert got[("vllm:prefix_cache_queries_total", lbl)] == 200
    assert got[("vllm:prefix_cache_hits_total", lbl)] == 50
    assert got[("vllm:gpu_prefix_cache_hit_rate", lbl)] == 0.25
    assert got[("loraplex:adapter_cache_hits_total", lbl)] == 7
    assert got[("loraplex:adapter_load_seconds_total", lbl)] == 0.5
    assert got[("loraplex:adapters_gpu_resident", lbl)] == 2
    info = [k for k in got if k[0] == "vllm:lora_requests_info"]
    assert info == [
        (
            "vllm:lora_requests_info",
            (("max_lora", "4"), ("running_lora_adapters", "a,b"), ("waiting_lora_adapters", "c")),
        )
    ]
    stats.num_running = 0
    assert samples(m)[("vllm:num_requests_running", lbl)] == 0


def test_mapping_stats_and_a_failing_engine() -> None:
    m = Metrics("demo", engine_stats=lambda: {"running": 1, "waiting": 0})
    assert samples(m)[("vllm:num_requests_running", (("model_name", "demo"),))] == 1

    def dead() -> object:
        raise RuntimeError("engine died")

    broken = Metrics("demo", engine_stats=dead)
    got = samples(broken)  # still renders, without engine series
    assert not any(name == "vllm:num_requests_running" for name, _ in got)
    assert any(name == "vllm:prompt_tokens_total" for name, _ in got)


def test_the_engines_own_stats_snapshot_is_read() -> None:
    # The real EngineStats of engine/engine.py, so a renamed field shows up here and not on a dashboard.
    from engine.engine import EngineStats

    snapshot = EngineStats(
        running=2,
        waiting=5,
        kv_usage=0.75,
        num_kv_blocks=64,
        prefix_hit_rate=0.4,
        adapter_cache={"hits": 3.0, "misses": 1.0, "loads": 1.0, "load_seconds": 0.2, "slots": 4.0},
        running_adapters=["x", "y"],
        waiting_adapters=[],
    )
    got = samples(Metrics("demo", engine_stats=lambda: snapshot))
    lbl = (("model_name", "demo"),)
    assert got[("vllm:num_requests_running", lbl)] == 2
    assert got[("vllm:num_requests_waiting", lbl)] == 5
    assert got[("vllm:kv_cache_usage_perc", lbl)] == 0.75
    assert got[("vllm:gpu_prefix_cache_hit_rate", lbl)] == 0.4
    assert got[("loraplex:adapter_cache_misses_total", lbl)] == 1
    info = next(labels for name, labels in got if name == "vllm:lora_requests_info")
    assert dict(info) == {"max_lora": "4", "running_lora_adapters": "x,y", "waiting_lora_adapters": ""}


def test_model_name_learned_when_the_engine_has_loaded() -> None:
    loaded: list[str] = []

    def name() -> str:
        if not loaded:
            raise RuntimeError("model loading")
        return loaded[0]

    m = Metrics(name, engine_stats=lambda: None)
    assert not any(labels for _, labels in samples(m) if ("model_name", "") in labels)
    loaded.append("demo-llama")
    m.request_finished("stop", 2, 1, 0.1)
    got = samples(m)
    assert got[("vllm:prompt_tokens_total", (("model_name", "demo-llama"),))] == 2
    assert (
        got[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "demo-llama")))]
        == 0
    )
