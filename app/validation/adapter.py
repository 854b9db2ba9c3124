"""One entry point: check an uploaded (adapter_config.json, adapter_model.safetensors) pair."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .base_model import BaseModelSpec
from .errors import AdapterRejected
from .lora_config import LoraSpec, check_lora_config, parse_config_json
from .lora_weights import check_tensors, scan_finite
from .safetensors_header import DEFAULT_MAX_HEADER_BYTES, SafetensorsLayout, read_layout
from .sniff import SNIFF_BYTES, sniff


@dataclass(frozen=True, slots=True)
class ValidatedAdapter:
    spec: LoraSpec
    layout: SafetensorsLayout
    config: dict[str, object]


def validate_adapter(
    config_path: str | Path,
    weights_path: str | Path,
    base: BaseModelSpec,
    max_rank: int,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> ValidatedAdapter:
    """Blocking (reads the whole weights file once): call it from a worker thread in async code.

    Order matters: cheap, bounded checks first (magic bytes, the capped header), so a hostile file is
    refused before its data is ever scanned.
    """
    with open(config_path, "rb") as f:
        raw_config = f.read(SNIFF_BYTES)
        sniff(raw_config, "adapter_config")
        raw_config += f.read()
    config = parse_config_json(raw_config)
    spec = check_lora_config(config, base, max_rank)
    size = os.path.getsize(weights_path)
    with open(weights_path, "rb") as f:
        sniff(f.read(SNIFF_BYTES), "weights")
        layout = read_layout(f, size, max_header_bytes)
        check_tensors(layout, spec, base)
        scan_finite(f, layout)
    return ValidatedAdapter(spec, layout, config)


__all__ = ["AdapterRejected", "ValidatedAdapter", "validate_adapter"]
