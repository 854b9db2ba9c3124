"""One engine configuration: Settings builds the EngineConfig itself, and each setting has one default."""

from __future__ import annotations

import dataclasses

import pytest

from app.config import ENGINE_FIELDS, Settings, SettingsError
from engine.config import EngineConfig


def test_each_engine_setting_defaults_to_the_engine_s_own_default(tmp_path):
    settings = Settings.from_env({"LORAPLEX_DATA_DIR": str(tmp_path), "LORAPLEX_MODEL": "/models/m"})
    config = settings.engine_config()
    assert config == EngineConfig(model="/models/m")
    engine_defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    for name in ENGINE_FIELDS:
        if name != "model":
            assert getattr(Settings(), name) == engine_defaults[name], name


def test_the_documented_variables_reach_the_engine(tmp_path):
    env = {
        "LORAPLEX_DATA_DIR": str(tmp_path),
        "LORAPLEX_MODEL": "/models/m",
        "LORAPLEX_DEVICE": "cuda:1",
        "LORAPLEX_DTYPE": "float16",
        "LORAPLEX_MAX_LORAS": "8",
        "LORAPLEX_MAX_CPU_LORAS": "32",
        "LORAPLEX_MAX_LORA_RANK": "128",
        "LORAPLEX_GPU_MEMORY_FRACTION": "0.5",
        "LORAPLEX_MAX_MODEL_LEN": "4096",
        "LORAPLEX_MAX_NUM_SEQS": "128",
        "LORAPLEX_MAX_NUM_BATCHED_TOKENS": "4096",
        "LORAPLEX_KV_CACHE_BYTES": str(1 << 30),
        "LORAPLEX_ENABLE_PREFIX_CACHING": "false",
        "LORAPLEX_CUDA_GRAPHS": "off",
        "LORAPLEX_ASYNC_SCHEDULING": "0",
    }
    config = Settings.from_env(env).engine_config()
    assert config == EngineConfig(
        model="/models/m",
        device="cuda:1",
        dtype="float16",
        max_loras=8,
        max_cpu_loras=32,
        max_lora_rank=128,
        gpu_memory_fraction=0.5,
        max_model_len=4096,
        max_num_seqs=128,
        max_num_batched_tokens=4096,
        kv_cache_bytes=1 << 30,
        enable_prefix_caching=False,
        cuda_graphs=False,
        async_scheduling=False,
    )


def test_no_model_means_no_engine(tmp_path):
    assert Settings.from_env({"LORAPLEX_DATA_DIR": str(tmp_path)}).engine_config() is None


@pytest.mark.parametrize(
    ("name", "value"),
    [("LORAPLEX_DTYPE", "int8"), ("LORAPLEX_MAX_NUM_BATCHED_TOKENS", "0"), ("LORAPLEX_CUDA_GRAPHS", "maybe")],
)
def test_bad_engine_values_name_the_variable(tmp_path, name, value):
    env = {"LORAPLEX_DATA_DIR": str(tmp_path), "LORAPLEX_MODEL": "/models/m", name: value}
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


def test_a_value_the_engine_refuses_is_a_settings_error(tmp_path):
    # Settings' own checks name the variable first; the engine's __post_init__ is the last word.
    settings = Settings(model="/models/m", data_dir=tmp_path)
    with pytest.raises(SettingsError, match="engine settings: max_lora_rank"):
        dataclasses.replace(settings, max_lora_rank=0).engine_config()
