"""LORAPLEX_TENSOR_PARALLEL_SIZE reaches EngineConfig.tensor_parallel_size; bad values name the variable."""

from __future__ import annotations

import pytest

from app.config import Settings, SettingsError


def test_tensor_parallel_size_from_the_environment(tmp_path):
    env = {"LORAPLEX_DATA_DIR": str(tmp_path), "LORAPLEX_MODEL": "/models/m"}
    config = Settings.from_env({**env, "LORAPLEX_TENSOR_PARALLEL_SIZE": "4"}).engine_config()
    assert config is not None and config.tensor_parallel_size == 4
    default = Settings.from_env(env).engine_config()
    assert default is not None and default.tensor_parallel_size == 1
    with pytest.raises(SettingsError, match="LORAPLEX_TENSOR_PARALLEL_SIZE"):
        Settings.from_env({**env, "LORAPLEX_TENSOR_PARALLEL_SIZE": "0"})


def test_fully_sharded_loras_from_the_environment(tmp_path):
    env = {
        "LORAPLEX_DATA_DIR": str(tmp_path),
        "LORAPLEX_MODEL": "/models/m",
        "LORAPLEX_TENSOR_PARALLEL_SIZE": "2",
    }
    config = Settings.from_env({**env, "LORAPLEX_FULLY_SHARDED_LORAS": "true"}).engine_config()
    assert config is not None and config.fully_sharded_loras is True
    default = Settings.from_env(env).engine_config()
    assert default is not None and default.fully_sharded_loras is False
    with pytest.raises(SettingsError, match="LORAPLEX_FULLY_SHARDED_LORAS"):
        Settings.from_env({**env, "LORAPLEX_FULLY_SHARDED_LORAS": "maybe"})
