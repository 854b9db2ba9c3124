"""Checks on PEFT's adapter_config.json: only what the engine computes exactly is accepted.

Keys fall in three groups. Read: the ones that define the LoRA math. Refused when active: options that
change the forward pass in ways the engine does not implement (DoRA, extra bias, per-module ranks...),
each refused by name. Known and harmless: training-time options. Anything else is ignored with a warning.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .base_model import SUPPORTED_MODULES, BaseModelSpec
from .errors import AdapterRejected

MAX_CONFIG_BYTES = 1024 * 1024

_READ = {"peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules", "bias"}

# name -> why it is refused when set to anything but its inactive default.
_REFUSED_WHEN_ACTIVE = {
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "rank_pattern": "rank_pattern (per-module ranks) is not supported; use one r",
    "alpha_pattern": "alpha_pattern (per-module alphas) is not supported; use one lora_alpha",
    "layers_to_transform": "layers_to_transform (LoRA on some layers only) is not supported",
    "layers_pattern": "layers_pattern is not supported",
    "exclude_modules": "exclude_modules is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters is not supported",
    "lora_bias": "lora_bias (a trained bias on lora_B) is not supported",
    "fan_in_fan_out": "fan_in_fan_out is for Conv1D models, not this architecture",
    "use_qalora": "QALoRA is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "megatron_config": "Megatron-parallel LoRA is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "kasa_config": "KaSA is not supported",
}

# Training-time or bookkeeping options that do not change inference.
_HARMLESS = {
    "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying",
}  # fmt: skip

_OTHER_ARCH_MODULES = {
    "c_attn",
    "c_proj",
    "c_fc",
    "query_key_value",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "Wqkv",
}


@dataclass(frozen=True, slots=True)
class LoraSpec:
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # short names, in the engine's order (q, k, v, o, gate, up, down)
    warnings: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _reject(code: str, message: str) -> AdapterRejected:
    return AdapterRejected(code, f"adapter_config: {message}", param="adapter_config")


def _is_active(value: Any) -> bool:
    return value not in (None, False, "", [], {}, 0)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _reject("malformed_config", f"key '{key[:100]}' appears twice")
        out[key] = value
    return out


def parse_config_json(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterRejected(
            "config_too_large",
            f"adapter_config: {len(raw)} bytes; at most {MAX_CONFIG_BYTES} are accepted",
            param="adapter_config",
            status_code=413,
        )
    try:
        # Plain UTF-8, no byte-order mark: exactly what the engine's loader will read back.
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except AdapterRejected:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _reject("malformed_config", "not valid UTF-8 JSON") from None
    if not isinstance(parsed, dict):
        raise _reject("malformed_config", "must be a JSON object")
    return parsed


def _target_name(entry: Any, model_type: str) -> str:
    # Only the short names: the engine's loader reads exactly these, so nothing accepted here can fail there.
    if not isinstance(entry, str):
        raise _reject("unsupported_target_module", "target_modules must hold module names (strings)")
    if entry not in SUPPORTED_MODULES:
        code = "wrong_architecture" if entry in _OTHER_ARCH_MODULES else "unsupported_target_module"
        raise _reject(
            code,
            f"target module '{entry[:100]}' is not a projection of this {model_type} model; "
            f"supported: {', '.join(SUPPORTED_MODULES)}",
        )
    return entry


def _targets(value: Any, model_type: str) -> tuple[str, ...]:
    if value == "all-linear":
        # PEFT's shorthand for every linear layer but the output head: all seven projections here.
        return SUPPORTED_MODULES
    if isinstance(value, str):
        # A single string is a regular expression to PEFT; we accept only a plain module name.
        value = [value]
    if not isinstance(value, list) or not value:
        raise _reject("unsupported_target_module", "target_modules must be a non-empty list of module names")
    chosen = {_target_name(entry, model_type) for entry in value}
    return tuple(m for m in SUPPORTED_MODULES if m in chosen)


def _rank(value: Any, max_rank: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _reject("invalid_rank", f"r must be a positive integer, got {str(value)[:40]}")
    if value > max_rank:
        raise _reject("rank_too_high", f"r={value} exceeds this server's maximum LoRA rank {max_rank}")
    return value


def _alpha(value: Any) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _reject("invalid_alpha", f"lora_alpha must be a positive number, got {str(value)[:40]}")
    return float(value)


def check_lora_config(config: dict[str, Any], base: BaseModelSpec, max_rank: int) -> LoraSpec:
    """Validate a parsed adapter_config.json against the served model; return what the engine needs."""
    if config.get("peft_type") != "LORA":
        raise _reject(
            "unsupported_peft_type", f"peft_type must be LORA, got {str(config.get('peft_type'))[:40]}"
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise _reject(
            "unsupported_task_type", f"task_type must be CAUSAL_LM, got {str(config['task_type'])[:40]}"
        )
    if config.get("bias", "none") != "none":
        raise _reject("bias_refused", f"bias must be 'none', got {str(config.get('bias'))[:40]}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _reject("malformed_config", "use_rslora must be true or false")
    for key, reason in _REFUSED_WHEN_ACTIVE.items():
        if _is_active(config.get(key)):
            raise _reject(f"{key}_refused", reason)
    if "target_modules" not in config or "r" not in config or "lora_alpha" not in config:
        missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
        raise _reject("malformed_config", f"missing required key(s): {', '.join(missing)}")
    known = _READ | set(_REFUSED_WHEN_ACTIVE) | _HARMLESS
    warnings = tuple(
        f"adapter_config: unknown key '{key[:100]}' ignored" for key in config if key not in known
    )
    return LoraSpec(
        rank=_rank(config["r"], max_rank),
        alpha=_alpha(config["lora_alpha"]),
        use_rslora=use_rslora,
        target_modules=_targets(config["target_modules"], base.model_type),
        warnings=warnings[:20],
    )
