"""Checks on adapter_model.safetensors: every tensor is an A or B of a targeted projection, shaped for
the served model, finite, and nothing is missing."""

from __future__ import annotations

import re
from typing import Any, BinaryIO

import numpy as np

from .base_model import ATTENTION_MODULES, BaseModelSpec
from .errors import AdapterRejected
from .lora_config import LoraSpec
from .safetensors_header import SafetensorsLayout, TensorEntry

# PEFT's saved names for a causal LM: base_model.model.<HF module path>.lora_{A,B}.weight.
_TENSOR_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(0|[1-9][0-9]{0,5})\."
    r"(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)\.weight"
)

# Exponent bits all ones = Inf or NaN, for each accepted dtype viewed as unsigned integers.
_NON_FINITE_MASK: dict[str, tuple[np.dtype[Any], int]] = {
    "F16": (np.dtype("<u2"), 0x7C00),
    "BF16": (np.dtype("<u2"), 0x7F80),
    "F32": (np.dtype("<u4"), 0x7F800000),
}
_SCAN_CHUNK_BYTES = 4 * 1024 * 1024


def _reject(code: str, message: str) -> AdapterRejected:
    return AdapterRejected(code, f"weights: {message}", param="weights")


def _parse_name(name: str, base: BaseModelSpec) -> tuple[int, str, str]:
    match = _TENSOR_NAME.fullmatch(name)
    if match is None:
        if "lora_magnitude_vector" in name:
            raise _reject(
                "use_dora_refused", f"tensor '{name[:200]}' is a DoRA magnitude; DoRA is not supported"
            )
        raise _reject(
            "unexpected_tensor",
            f"tensor '{name[:200]}' is not a LoRA A/B of a {base.model_type} projection",
        )
    layer, parent, module, side = int(match[1]), match[2], match[3], match[4]
    if (parent == "self_attn") != (module in ATTENTION_MODULES):
        raise _reject("unexpected_tensor", f"tensor '{name[:200]}' puts {module} under {parent}")
    if layer >= base.num_layers:
        raise _reject(
            "wrong_architecture",
            f"tensor '{name[:200]}' is for layer {layer} but the base model has {base.num_layers} layers",
        )
    return layer, module, side


def check_tensors(layout: SafetensorsLayout, spec: LoraSpec, base: BaseModelSpec) -> None:
    """Names, targets, shapes and completeness; raises AdapterRejected naming the first problem."""
    seen: set[tuple[int, str, str]] = set()
    for name, entry in layout.tensors.items():
        layer, module, side = _parse_name(name, base)
        if module not in spec.target_modules:
            raise _reject(
                "unexpected_tensor",
                f"tensor '{name[:200]}' is for {module}, which target_modules does not list",
            )
        in_features, out_features = base.module_dims(module)
        expected = (spec.rank, in_features) if side == "A" else (out_features, spec.rank)
        if entry.shape != expected:
            raise _reject(
                "shape_mismatch",
                f"tensor '{name[:200]}' has shape {list(entry.shape)}; this base model and r={spec.rank} "
                f"need {list(expected)}",
            )
        seen.add((layer, module, side))
    for layer in range(base.num_layers):
        for module in spec.target_modules:
            for side in ("A", "B"):
                if (layer, module, side) not in seen:
                    parent = "self_attn" if module in ATTENTION_MODULES else "mlp"
                    raise _reject(
                        "missing_tensor",
                        f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{side}.weight is missing",
                    )


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
