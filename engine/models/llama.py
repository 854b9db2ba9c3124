"""Llama 2/3 (3.2's tied embeddings too), Mistral and Qwen2: the shared decoder as it is.

Mistral's `sliding_window` applies to every layer; Qwen2's only with `use_sliding_window`, to the layers
its `layer_types` (or, in older configs, `max_window_layers`) say. The loader reads both
(engine/model_loader.py); Qwen2 adds q/k/v biases.
"""

from __future__ import annotations

from typing import Any

from engine.model_config import FULL, SLIDING
from engine.models.family import Family


def qwen_window(raw: dict[str, Any]) -> dict[str, Any]:
    """Qwen2/Qwen3: the window only with `use_sliding_window`, on the layers from `max_window_layers` on
    unless `layer_types` lists them."""
    if not raw.get("use_sliding_window", False):
        return {"sliding_window": None}
    if raw.get("layer_types") is not None:
        return {}
    first = int(raw.get("max_window_layers", 0))
    layers = int(raw["num_hidden_layers"])
    return {"layer_types": tuple(SLIDING if i >= first else FULL for i in range(layers))}


def _qwen2(raw: dict[str, Any]) -> dict[str, Any]:
    bias = bool(raw.get("attention_bias", False))
    return {**qwen_window(raw), "qkv_bias": True, "o_bias": bias}


LLAMA = Family("llama")
MISTRAL = Family("mistral")
QWEN2 = Family("qwen2", _qwen2)
