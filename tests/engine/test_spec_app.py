"""LORAPLEX_SPECULATIVE_CONFIG reaches the engine's config, and the engine's counters reach /metrics under
vLLM's names."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings, SettingsError
from app.metrics import Metrics
from engine.engine import EngineStats
from engine.spec.config import SpeculativeConfig


def test_env_var_is_json_in_vllms_shape():
    s = Settings.from_env({"LORAPLEX_MODEL": "m", "LORAPLEX_SPECULATIVE_CONFIG":
                           '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}'})  # fmt: skip
    config = s.engine_config()
    assert config is not None
    assert config.speculative == SpeculativeConfig("ngram", 3, prompt_lookup_max=4)
    assert Settings.from_env({"LORAPLEX_MODEL": "m"}).engine_config().speculative is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("ngram", "expected a JSON object"),
        ("[1, 2]", "expected a JSON object"),
        ('{"method": "ngram"}', "num_speculative_tokens"),
        ('{"method": "medusa", "num_speculative_tokens": 2}', "method"),
    ],
)
def test_bad_env_var_names_itself(raw, message):
    with pytest.raises(SettingsError, match=f"LORAPLEX_SPECULATIVE_CONFIG.*{message}"):
        Settings.from_env({"LORAPLEX_MODEL": "m", "LORAPLEX_SPECULATIVE_CONFIG": raw})


def scrape(stats: EngineStats) -> dict:
    body, _ = Metrics("demo", engine_stats=lambda: stats).render()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_counters_exported_with_vllms_names():
    spec = {
        "num_drafts": 5,
        "num_draft_tokens": 20,
        "num_accepted_tokens": 9,
        "accepted_per_pos": [4, 3, 2, 0],
    }
    got = scrape(EngineStats(running=1, waiting=0, kv_usage=0.0, num_kv_blocks=8, prefix_hit_rate=0.0,
                             spec_decode=spec))  # fmt: skip
    lbl = (("model_name", "demo"),)
    assert got[("vllm:spec_decode_num_drafts_total", lbl)] == 5
    assert got[("vllm:spec_decode_num_draft_tokens_total", lbl)] == 20
    assert got[("vllm:spec_decode_num_accepted_tokens_total", lbl)] == 9
    per_pos = {dict(k[1])["position"]: v for k, v in got.items()
               if k[0] == "vllm:spec_decode_num_accepted_tokens_per_pos_total"}  # fmt: skip
    assert per_pos == {"0": 4, "1": 3, "2": 2, "3": 0}
    off = scrape(EngineStats(running=1, waiting=0, kv_usage=0.0, num_kv_blocks=8, prefix_hit_rate=0.0))
    assert not any(name.startswith("vllm:spec_decode") for name, _ in off)
