"""Checks on adapter_model.safetensors: every tensor is an A or B of a targeted projection, shaped for
the served model, finite, and nothing is missing."""

from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np

from engine.adapter_format import AdapterError, parse_tensor_name, tensor_name

from .base_model import BaseModelSpec
from .errors import AdapterRejected, rejected
from .lora_config import LoraSpec
from .safetensors_header import SafetensorsLayout, TensorEntry

# Exponent bits all ones = Inf or NaN, for each accepted dtype viewed as unsigned integers.
_NON_FINITE_MASK: dict[str, tuple[np.dtype[Any], int]] = {
    "F16": (np.dtype("<u2"), 0x7C00),
    "BF16": (np.dtype("<u2"), 0x7F80),
    "F32": (np.dtype("<u4"), 0x7F800000),
}
_SCAN_CHUNK_BYTES = 4 * 1024 * 1024


def _reject(code: str, message: str) -> AdapterRejected:
    return AdapterRejected(code, f"weights: {message}", param="weights")


def check_tensors(layout: SafetensorsLayout, spec: LoraSpec, base: BaseModelSpec) -> None:
    """Names, targets, per-module ranks, shapes and completeness (the contract's tensor names, the ranks
    rank_pattern gives); raises AdapterRejected naming the first problem."""
    seen: set[tuple[int, str, str]] = set()
    for name, entry in layout.tensors.items():
        try:
            layer, module, side = parse_tensor_name(name, base.num_layers)
        except AdapterError as exc:
            raise rejected(exc) from None
        if module not in spec.target_modules or not spec.transforms(layer):
            raise _reject(
                "unexpected_tensor",
                f"tensor '{name[:200]}' is for {module} of layer {layer}, which adapter_config does not target",
            )
        in_features, out_features = base.module_dims(module)
        rank = spec.rank_of(layer, module)
        expected = (rank, in_features) if side == "A" else (out_features, rank)
        if entry.shape != expected:
            raise _reject(
                "shape_mismatch",
                f"tensor '{name[:200]}' has shape {list(entry.shape)}; this base model and r={rank} "
                f"need {list(expected)}",
            )
        seen.add((layer, module, side))
    for layer in range(base.num_layers):
        for module in spec.target_modules if spec.transforms(layer) else ():
            for side in ("A", "B"):
                if (layer, module, side) not in seen:
                    raise _reject("missing_tensor", f"{tensor_name(layer, module, side)} is missing")


def _scan_tensor(f: BinaryIO, entry: TensorEntry) -> None:
    view, mask = _NON_FINITE_MASK[entry.dtype]
    chunk = _SCAN_CHUNK_BYTES - _SCAN_CHUNK_BYTES % entry.itemsize
    f.seek(entry.start)
    remaining = entry.end - entry.start
    while remaining:
        data = f.read(min(chunk, remaining))
        if not data:
            raise _reject("truncated_file", f"the file ended inside tensor '{entry.name[:200]}'")
        remaining -= len(data)
        values = np.frombuffer(data, dtype=view)
        if np.any((values & mask) == mask):
            raise _reject("non_finite_values", f"tensor '{entry.name[:200]}' holds NaN or Inf values")


def scan_finite(f: BinaryIO, layout: SafetensorsLayout) -> None:
    """Read every tensor in bounded chunks and refuse any NaN or Inf."""
    for entry in sorted(layout.tensors.values(), key=lambda e: e.start):
        _scan_tensor(f, entry)
