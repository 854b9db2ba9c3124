"""The served base model's shapes, read from its config.json as plain JSON (app/ never imports torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.adapter_format import TARGET_MODULES, module_dims

# The architectures the engine runs (the adapter-format contract says which projections each allows).
SUPPORTED_MODEL_TYPES = tuple(TARGET_MODULES)


class BaseModelError(RuntimeError):
    """The server's own model folder is unusable: an operator problem, never the uploader's."""


@dataclass(frozen=True, slots=True)
class BaseModelSpec:
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection (k/v narrower under GQA; Phi-3's fused ones too)."""
        return module_dims(
            module,
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise BaseModelError(f"base model config.json: '{key}' must be a positive integer, got {value!r}")
    return value


def spec_from_config(config: dict[str, Any]) -> BaseModelSpec:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BaseModelError(
            f"base model type {model_type!r} is not served; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hidden = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return BaseModelSpec(
        model_type=model_type,
        num_layers=_positive_int(config, "num_hidden_layers"),
        hidden_size=hidden,
        intermediate_size=_positive_int(config, "intermediate_size"),
        num_heads=heads,
        num_kv_heads=_positive_int({"num_key_value_heads": kv_heads}, "num_key_value_heads"),
        head_dim=_positive_int({"head_dim": head_dim}, "head_dim"),
    )


def load_base_model_spec(model_dir: str | Path) -> BaseModelSpec:
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaseModelError(f"base model config not found at {path}") from None
    except ValueError as exc:
        raise BaseModelError(f"base model config {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise BaseModelError(f"base model config {path} is not a JSON object")
    return spec_from_config(config)
