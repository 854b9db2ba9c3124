"""Settings from `LORAPLEX_*` environment variables, validated once at start.

Each field of `Settings` is read from `LORAPLEX_<FIELD NAME IN UPPER CASE>`; its type annotation decides
how the text is parsed, so adding a setting is one line here (plus a check in `_validate` when a range
matters). Defaults make `loraplex serve` work on a laptop with nothing else running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.spec.config import SpeculativeConfig

ENV_PREFIX = "LORAPLEX_"
SECRET_FILE = "secret"


class SettingsError(ValueError):
    """A `LORAPLEX_*` variable holds a value we cannot use; the message names the variable."""


def _engine_default(name: str) -> Any:
    return _ENGINE_DEFAULTS[name]


_ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}


@dataclass(frozen=True, slots=True)
class Settings:
    # Storage. database_url None = SQLite file under data_dir (filled in by from_env).
    data_dir: Path = Path("./data")
    database_url: str | None = None
    redis_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = field(default=None, repr=False)
    s3_secret_access_key: str | None = field(default=None, repr=False)
    # Adapter uploads (docs/adapters.md): the weights file's size limit (1 GiB), and how often files
    # left behind by failed uploads or deletions are swept from the object store.
    max_upload_bytes: int = 1_073_741_824
    adapter_sweep_interval_seconds: float = 600.0

    # The engine (docs/foundation.md's table). Every field named like an EngineConfig field is passed to
    # it by engine_config(), and its default is EngineConfig's own, so each setting has one default.
    # model None = no engine (`serve` fills in the demo model).
    model: str | None = None
    device: str = _engine_default("device")
    dtype: str = _engine_default("dtype")
    max_loras: int = _engine_default("max_loras")
    max_cpu_loras: int = _engine_default("max_cpu_loras")
    max_lora_rank: int = _engine_default("max_lora_rank")
    gpu_memory_fraction: float = _engine_default("gpu_memory_fraction")
    max_model_len: int | None = _engine_default("max_model_len")
    max_num_seqs: int = _engine_default("max_num_seqs")
    max_num_batched_tokens: int = _engine_default("max_num_batched_tokens")
    kv_cache_bytes: int | None = _engine_default("kv_cache_bytes")
    enable_prefix_caching: bool = _engine_default("enable_prefix_caching")
    cuda_graphs: bool = _engine_default("cuda_graphs")
    async_scheduling: bool = _engine_default("async_scheduling")
    # FP8 base weights (unset: as the checkpoint stores them) and deterministic mode (docs/quantization.md).
    quantization: str | None = _engine_default("quantization")
    deterministic: bool = _engine_default("deterministic")
    # Speculative decoding (docs/speculative.md): JSON in vLLM's shape, e.g.
    # {"method": "ngram", "num_speculative_tokens": 4}; unset = off.
    speculative_config: dict[str, Any] | None = None
    tensor_parallel_size: int = _engine_default("tensor_parallel_size")  # GPUs per engine (docs/parallel.md)
    fully_sharded_loras: bool = _engine_default("fully_sharded_loras")  # shard LoRA A too (docs/parallel.md)
    # Adapter files fetched for the engine under data_dir/adapter-cache; least recently used go past this.
    adapter_disk_cache_bytes: int = 20 * 1024**3

    # Security. secret None = generated once and kept in data_dir/secret (see ensure_secret).
    secret: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)
    key_cache_ttl_seconds: float = 2.0
    last_used_flush_seconds: float = 10.0

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = 8000
    max_request_bytes: int = 1_048_576
    # On SIGTERM: how long running requests (streams included) may take to finish before the rest are
    # cut off and the process exits (docs/reliability.md, graceful drain).
    shutdown_timeout: float = 30.0
    # Requests a process queues beyond the engine's max_num_seqs; past that, 503 server_overloaded at
    # once (docs/reliability.md), not an unbounded queue.
    max_queued_requests: int = 1024
    # Prompts in one /v1/completions request (a list of prompts): each is an engine request of its own.
    max_prompts_per_request: int = 64

    # Limits and metering (docs/metering.md). A reservation older than usage_sweep_after_seconds
    # belongs to a dead process: the sweeper expires it and its concurrency slot is freed.
    redis_key_prefix: str = "lpx"
    redis_timeout_seconds: float = 0.5  # longer than this and the in-process limiter decides instead
    usage_sweep_after_seconds: float = 900.0
    usage_sweep_interval_seconds: float = 60.0
    usage_retry_seconds: float = 1.0
    usage_db_timeout_seconds: float = 5.0
    # Database pool (docs/reliability.md): None = derived from max_num_seqs (pool_sizing below); a request
    # waiting longer than db_pool_timeout_seconds for a connection gets a 503 with Retry-After.
    db_pool_size: int | None = None
    db_pool_timeout_seconds: float = 2.0

    # Logs: json (one object a line), console (readable), or auto (json unless stderr is a terminal).
    log_format: str = "auto"
    log_level: str = "INFO"

    # Tool calling with tool_choice auto (docs/serving.md): the model family's tool-call format, hermes
    # or llama3_json; None = guessed from the tokenizer's chat template.
    tool_call_parser: str | None = None
    # Scale-out on Ray Serve (docs/scale-out.md). ray: set by `serve --ray`. engine_replicas None = the
    # cluster's GPUs (or 1); engine_replica_gpus None = 1 on a cluster with GPUs (device not cpu), else 0.
    ray: bool = False
    ray_address: str | None = None
    engine_replicas: int | None = None
    engine_replica_gpus: float | None = None
    engine_replica_cpus: float = 1.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `LORAPLEX_*` variables; raises SettingsError naming the first bad variable."""
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _parse(name, raw.strip(), hints[f.name])
        settings = cls(**values)
        if settings.database_url is None:
            db_path = (settings.data_dir / "loraplex.db").resolve()
            settings = dataclasses.replace(settings, database_url=f"sqlite+aiosqlite:///{db_path}")
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise SettingsError for the first value out of range; called by from_env and create_app."""
        for msg_field, ok, expect in _checks(self):
            if not ok:
                value = getattr(self, msg_field)
                raise SettingsError(f"{ENV_PREFIX}{msg_field.upper()}: {expect}, got {value!r}")
        try:
            SpeculativeConfig.parse(self.speculative_config)
        except (ValueError, TypeError) as exc:
            raise SettingsError(f"{ENV_PREFIX}SPECULATIVE_CONFIG: {exc}") from None
        self.engine_config()

    def engine_config(self) -> EngineConfig | None:
        """The engine's configuration from these settings; None when no model is configured."""
        if self.model is None:
            return None
        try:
            return EngineConfig(**{name: getattr(self, name) for name in ENGINE_FIELDS})
        except ValueError as exc:  # a combination the engine refuses that no single check above caught
            raise SettingsError(f"engine settings: {exc}") from None

    @property
    def pool_sizing(self) -> tuple[int, int]:
        """(pool size, overflow). A request holds a connection only for one short query at a time
        (admission, usage reservation, settlement), so a quarter of the engine's sequences, doubled by
        the overflow under bursts, covers it; 5..20 keeps PostgreSQL's 100 connections for a few servers."""
        size = self.db_pool_size or min(max(self.max_num_seqs // 4, 5), 20)
        return size, size

    @property
    def is_sqlite(self) -> bool:
        return (self.database_url or "").startswith("sqlite")

    def only(self, *names: str) -> dict[str, Any]:
        """The named fields as a dict, so a component receives just what it needs."""
        return {n: getattr(self, n) for n in names}


# The settings that engine_config() passes on: those named like a field of EngineConfig.
ENGINE_FIELDS = tuple(f.name for f in fields(Settings) if f.name in _ENGINE_DEFAULTS)


def _checks(s: Settings) -> list[tuple[str, bool, str]]:
    db = s.database_url or ""
    return [
        (
            "database_url",
            db.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")),
            "expected an async URL starting with sqlite+aiosqlite:// or postgresql+asyncpg://",
        ),
        (
            "redis_url",
            s.redis_url is None or s.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "expected redis://, rediss:// or unix://",
        ),
        (
            "s3_endpoint_url",
            s.s3_endpoint_url is None or s.s3_endpoint_url.startswith(("http://", "https://")),
            "expected an http(s):// URL",
        ),
        (
            "device",
            s.device in ("auto", "cpu", "cuda") or s.device.startswith("cuda:"),
            "expected auto, cpu, cuda or cuda:N",
        ),
        ("max_loras", s.max_loras >= 1, "expected an integer >= 1"),
        ("max_cpu_loras", s.max_cpu_loras >= s.max_loras, "expected an integer >= LORAPLEX_MAX_LORAS"),
        ("max_lora_rank", 1 <= s.max_lora_rank <= 1024, "expected an integer between 1 and 1024"),
        ("gpu_memory_fraction", 0.0 < s.gpu_memory_fraction <= 1.0, "expected a number in (0, 1]"),
        ("max_model_len", s.max_model_len is None or s.max_model_len >= 16, "expected an integer >= 16"),
        ("max_num_seqs", s.max_num_seqs >= 1, "expected an integer >= 1"),
        ("tensor_parallel_size", s.tensor_parallel_size >= 1, "expected an integer >= 1"),
        ("max_num_batched_tokens", s.max_num_batched_tokens >= 1, "expected an integer >= 1"),
        (
            "dtype",
            s.dtype in ("auto", "float32", "float16", "bfloat16"),
            "expected auto, float32, float16 or bfloat16",
        ),
        ("adapter_disk_cache_bytes", s.adapter_disk_cache_bytes >= 1 << 20, "expected at least 1 MiB"),
        ("quantization", s.quantization in (None, "fp8"), "expected fp8 (or unset: the checkpoint's own)"),
        (
            "kv_cache_bytes",
            s.kv_cache_bytes is None or s.kv_cache_bytes >= 1 << 20,
            "expected at least 1 MiB",
        ),
        ("secret", s.secret is None or len(s.secret) >= 16, "expected at least 16 characters"),
        (
            "admin_key",
            s.admin_key is None
            or (len(s.admin_key) >= 20 and s.admin_key.isprintable() and " " not in s.admin_key),
            "expected at least 20 printable characters without spaces",
        ),
        (
            "key_cache_ttl_seconds",
            0.0 <= s.key_cache_ttl_seconds <= 5.0,
            "expected 0..5 seconds (revocation must take effect within 5 s)",
        ),
        ("last_used_flush_seconds", s.last_used_flush_seconds > 0.0, "expected a positive number"),
        ("port", 0 <= s.port <= 65535, "expected a port number 0..65535"),
        ("max_request_bytes", s.max_request_bytes >= 1024, "expected an integer >= 1024"),
        ("shutdown_timeout", 0.0 <= s.shutdown_timeout <= 3600.0, "expected 0..3600 seconds"),
        ("max_queued_requests", s.max_queued_requests >= 0, "expected an integer >= 0"),
        ("max_prompts_per_request", 1 <= s.max_prompts_per_request <= 1024, "expected 1..1024"),
        ("max_upload_bytes", s.max_upload_bytes >= 1024, "expected an integer >= 1024"),
        (
            "adapter_sweep_interval_seconds",
            s.adapter_sweep_interval_seconds > 0.0,
            "expected a positive number",
        ),
        ("redis_key_prefix", s.redis_key_prefix.isidentifier(), "expected letters, digits or underscores"),
        (
            "tool_call_parser",
            s.tool_call_parser in (None, "hermes", "llama3_json"),
            "expected hermes or llama3_json",
        ),
        ("redis_timeout_seconds", 0.0 < s.redis_timeout_seconds <= 30.0, "expected 0..30 seconds"),
        ("usage_sweep_after_seconds", s.usage_sweep_after_seconds >= 60.0, "expected at least 60 seconds"),
        ("usage_sweep_interval_seconds", s.usage_sweep_interval_seconds > 0.0, "expected a positive number"),
        ("usage_retry_seconds", s.usage_retry_seconds > 0.0, "expected a positive number"),
        ("usage_db_timeout_seconds", s.usage_db_timeout_seconds > 0.0, "expected a positive number"),
        ("db_pool_size", s.db_pool_size is None or 1 <= s.db_pool_size <= 500, "expected 1..500"),
        ("db_pool_timeout_seconds", 0.0 < s.db_pool_timeout_seconds <= 60.0, "expected 0..60 seconds"),
        ("log_format", s.log_format in ("auto", "json", "console"), "expected auto, json or console"),
        ("engine_replicas", s.engine_replicas is None or 1 <= s.engine_replicas <= 1024, "expected 1..1024"),
        ("engine_replica_gpus", s.engine_replica_gpus is None or s.engine_replica_gpus >= 0, "expected >= 0"),
        ("engine_replica_cpus", s.engine_replica_cpus >= 0, "expected a number >= 0"),
        (
            "log_level",
            s.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
            "expected DEBUG, INFO, WARNING or ERROR",
        ),
    ]


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """`LORAPLEX_*` variables that no setting reads (typos, usually); tests' own LORAPLEX_TEST_* excepted."""
    env = os.environ if environ is None else environ
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    return sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIX) and name not in known and not name.startswith("LORAPLEX_TEST_")
    )


def _parse(name: str, raw: str, hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0]
    if typing.get_origin(hint) is dict:  # a JSON object, e.g. LORAPLEX_SPECULATIVE_CONFIG
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise SettingsError(f"{name}: expected a JSON object, got {raw!r}")
        return value
    try:
        if hint is bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is Path:
            return Path(raw)
        return hint(raw)
    except ValueError:
        kind = {int: "an integer", float: "a number", bool: "true or false"}.get(hint, "a valid value")
        raise SettingsError(f"{name}: expected {kind}, got {raw!r}") from None


def ensure_secret(settings: Settings) -> Settings:
    """Settings with a secret: the configured one, else the one kept in data_dir (made on first call)."""
    if settings.secret is not None:
        return settings
    path = settings.data_dir / SECRET_FILE
    if path.exists():
        secret = path.read_text().strip()
    else:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        # O_EXCL: two processes starting at once must not end up with different secrets.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            secret = path.read_text().strip()
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secret + "\n")
    result = dataclasses.replace(settings, secret=secret)
    result.validate()
    return result
