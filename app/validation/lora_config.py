"""Checks on PEFT's adapter_config.json: the adapter-format contract the engine's loader applies too
(engine/adapter_format.py), so only what the engine computes exactly is accepted.

Keys fall in three groups. Read: the ones that define the LoRA math (r, lora_alpha, use_rslora,
target_modules, rank_pattern, alpha_pattern, layers_to_transform), each value checked to be in range.
Refused when active: options that change the forward pass in ways the engine does not implement (DoRA,
extra bias...), each refused by name. Known and harmless: training-time options. Anything else is
ignored with a warning.
"""

from __future__ import annotations

from typing import Any

from engine.adapter_format import MAX_CONFIG_BYTES, AdapterError
from engine.adapter_format import LoraConfig as LoraSpec
from engine.adapter_format import check_lora_config as _check_lora_config
from engine.adapter_format import parse_config_json as _parse_config_json

from .base_model import BaseModelSpec
from .errors import rejected


def parse_config_json(raw: bytes) -> dict[str, Any]:
    try:
        return _parse_config_json(raw)
    except AdapterError as exc:
        raise rejected(exc) from None


def check_lora_config(config: dict[str, Any], base: BaseModelSpec, max_rank: int) -> LoraSpec:
    """Validate a parsed adapter_config.json against the served model; return what the engine needs."""
    try:
        return _check_lora_config(config, max_rank, base.model_type, base.num_layers)
    except AdapterError as exc:
        raise rejected(exc) from None


__all__ = ["MAX_CONFIG_BYTES", "LoraSpec", "check_lora_config", "parse_config_json"]
