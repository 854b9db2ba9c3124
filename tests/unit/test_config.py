"""Settings from LORAPLEX_* variables: defaults, parsing, and a clear message for every bad value."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from app.config import Settings, SettingsError, ensure_secret


def test_defaults_work_with_nothing_set(tmp_path):
    settings = Settings.from_env({"LORAPLEX_DATA_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite+aiosqlite:///{(tmp_path / 'loraplex.db').resolve()}"
    assert settings.is_sqlite
    assert settings.redis_url is None and settings.s3_endpoint_url is None and settings.model is None
    assert settings.admin_key is None and settings.secret is None
    assert settings.device == "auto"
    assert settings.port == 8000 and settings.host == "127.0.0.1"
    assert settings.data_dir == tmp_path
    assert 0 < settings.key_cache_ttl_seconds <= 5


def test_every_field_has_a_variable():
    env = {
        "LORAPLEX_DATABASE_URL": "postgresql+asyncpg://u:p@db:5432/lpx",
        "LORAPLEX_REDIS_URL": "redis://cache:6379/0",
        "LORAPLEX_S3_ENDPOINT_URL": "http://minio:9000",
        "LORAPLEX_S3_BUCKET": "adapters",
        "LORAPLEX_MODEL": "/models/llama",
        "LORAPLEX_ADMIN_KEY": "lpx_" + "A" * 43,
        "LORAPLEX_SECRET": "s" * 32,
        "LORAPLEX_DEVICE": "cuda:1",
        "LORAPLEX_MAX_LORAS": "8",
        "LORAPLEX_MAX_CPU_LORAS": "32",
        "LORAPLEX_MAX_LORA_RANK": "128",
        "LORAPLEX_GPU_MEMORY_FRACTION": "0.9",
        "LORAPLEX_DATA_DIR": "/var/lib/loraplex",
        "LORAPLEX_LOG_FORMAT": "json",
        "LORAPLEX_PORT": "9000",
    }
    s = Settings.from_env(env)
    assert s.database_url == env["LORAPLEX_DATABASE_URL"] and not s.is_sqlite
    assert (s.redis_url, s.s3_endpoint_url, s.s3_bucket, s.model) == (
        "redis://cache:6379/0",
        "http://minio:9000",
        "adapters",
        "/models/llama",
    )
    assert (s.max_loras, s.max_cpu_loras, s.max_lora_rank, s.gpu_memory_fraction) == (8, 32, 128, 0.9)
    assert s.device == "cuda:1" and s.port == 9000 and s.log_format == "json"
    assert s.data_dir == Path("/var/lib/loraplex")
    # Secrets stay out of repr (and so out of logs and tracebacks).
    assert env["LORAPLEX_SECRET"] not in repr(s) and env["LORAPLEX_ADMIN_KEY"] not in repr(s)


def test_blank_values_mean_unset(tmp_path):
    s = Settings.from_env(
        {"LORAPLEX_DATA_DIR": str(tmp_path), "LORAPLEX_REDIS_URL": "  ", "LORAPLEX_MODEL": ""}
    )
    assert s.redis_url is None and s.model is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LORAPLEX_PORT", "eighty"),
        ("LORAPLEX_PORT", "70000"),
        ("LORAPLEX_MAX_LORAS", "0"),
        ("LORAPLEX_MAX_LORAS", "2.5"),
        ("LORAPLEX_MAX_CPU_LORAS", "1"),
        ("LORAPLEX_MAX_LORA_RANK", "4096"),
        ("LORAPLEX_GPU_MEMORY_FRACTION", "1.5"),
        ("LORAPLEX_GPU_MEMORY_FRACTION", "lots"),
        ("LORAPLEX_DEVICE", "tpu"),
        ("LORAPLEX_DATABASE_URL", "postgresql://sync-driver/db"),
        ("LORAPLEX_DATABASE_URL", "mysql://x"),
        ("LORAPLEX_REDIS_URL", "http://cache"),
        ("LORAPLEX_S3_ENDPOINT_URL", "minio:9000"),
        ("LORAPLEX_SECRET", "short"),
        ("LORAPLEX_ADMIN_KEY", "tooshort"),
        ("LORAPLEX_ADMIN_KEY", "has a space in it somewhere ok"),
        ("LORAPLEX_KEY_CACHE_TTL_SECONDS", "60"),
        ("LORAPLEX_LOG_FORMAT", "xml"),
        ("LORAPLEX_LOG_LEVEL", "LOUD"),
        ("LORAPLEX_MAX_REQUEST_BYTES", "10"),
    ],
)
def test_bad_values_name_the_variable(tmp_path, name, value):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"LORAPLEX_DATA_DIR": str(tmp_path), name: value})
    assert str(err.value).startswith(f"{name}: expected")
    if name not in ("LORAPLEX_SECRET", "LORAPLEX_ADMIN_KEY"):
        assert repr(value) in str(err.value) or value in str(err.value)


def test_secret_is_made_once_and_kept(tmp_path):
    base = Settings.from_env({"LORAPLEX_DATA_DIR": str(tmp_path / "data")})
    first = ensure_secret(base)
    assert first.secret and len(first.secret) >= 32
    path = tmp_path / "data" / "secret"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_secret(base).secret == first.secret
    # A configured secret wins and nothing is written.
    other = Settings.from_env({"LORAPLEX_DATA_DIR": str(tmp_path / "other"), "LORAPLEX_SECRET": "x" * 20})
    assert ensure_secret(other).secret == "x" * 20
    assert not (tmp_path / "other").exists()


def test_only_passes_the_named_fields(tmp_path):
    s = Settings.from_env({"LORAPLEX_DATA_DIR": str(tmp_path)})
    assert s.only("max_loras", "device") == {"max_loras": 4, "device": "auto"}


def test_unknown_variables_are_reported():
    from app.config import unknown_variables

    env = {"LORAPLEX_DATABSE_URL": "x", "LORAPLEX_PORT": "1", "LORAPLEX_TEST_PG": "y", "OTHER": "z"}
    assert unknown_variables(env) == ["LORAPLEX_DATABSE_URL"]
