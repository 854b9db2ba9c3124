"""What a model family is to the loader: its config.json `model_type`, how the rest of its config.json
maps onto ModelConfig fields, and the model class (the shared CausalLM unless a family needs its own)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.models.causal_lm import CausalLM


def no_extras(raw: dict[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Family:
    model_type: str  # keys the adapter targets in engine/adapter_format.py TARGET_MODULES
    # config.json -> the ModelConfig fields this family sets beyond the common ones (engine/model_loader.py)
    config: Callable[[dict[str, Any]], dict[str, Any]] = no_extras
    model: type[CausalLM] = CausalLM
