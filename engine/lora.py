"""PEFT LoRA adapters: reading a folder (adapter_config.json + adapter_model.safetensors, nothing else).

An adapter becomes, per target module m, A [L, r_m, in_m] and B [L, out_m, r_m] (zeros for layers it
skips) plus one scaling. Modules whose own scaling differs (rank_pattern / alpha_pattern) get the ratio
folded into B, so one per-slot scale serves every module in a fused launch.
Everything is validated against the base model: an adapter is tenant data, and a bad one must be
refused with a clear message rather than crash or corrupt a batch shared with other tenants.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from torch import Tensor

from engine.model_loader import ModelConfig
from engine.ops import LORA_MODULES, MODULE_GROUPS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20

_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AdapterError(ValueError):
    """An adapter that cannot be served on this base model; the message says why."""


@dataclass
class LoRAAdapter:
    content_hash: str
    rank: int  # largest rank over its modules
    scaling: float  # per-slot scale; per-module differences are folded into `b`
    a: dict[str, Tensor]  # module -> [L, r_m, in_m]
    b: dict[str, Tensor]  # module -> [L, out_m, r_m]
    ranks: Tensor  # [L, G] int32: rank of each fused module group per layer (0 = not targeted)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each LoRA-capable projection of the base model."""
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"no {CONFIG_FILE} in adapter folder")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    return raw


def check_adapter_config(raw: dict[str, Any]) -> None:
    """Refuse, by name, every PEFT feature our LoRA path does not compute."""
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"peft_type {peft_type!r} is not supported (only LORA)")
    refusals = {
        "use_dora": "DoRA (use_dora) is not supported",
        "modules_to_save": "modules_to_save is not supported (it replaces base weights)",
        "lora_bias": "lora_bias is not supported",
        "fan_in_fan_out": "fan_in_fan_out is not supported",
        "layer_replication": "layer_replication is not supported",
        "trainable_token_indices": "trainable_token_indices is not supported",
        "use_qalora": "QALoRA is not supported",
    }
    for key, message in refusals.items():
        if raw.get(key):
            raise AdapterError(message)
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"bias={raw['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise AdapterError(f"{key} must be a positive number, got {value!r}")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(map(str, targets)) - set(LORA_MODULES))
        if unknown:
            raise AdapterError(f"target modules {unknown} are not supported (only {list(LORA_MODULES)})")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(raw.get(key) or {}, dict):
            raise AdapterError(f"{key} must be a mapping")


def _pattern_value(pattern: dict[str, Any], module_path: str, default: float) -> float:
    """PEFT's rule: a key applies when it matches the end of the module path at a name boundary."""
    for key, value in pattern.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module_path)
        except re.error as exc:
            raise AdapterError(f"bad pattern {key!r}: {exc}") from exc
        if hit:
            return float(value)
    return default


def _module_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if module in _ATTN else 'mlp'}.{module}"


def load_adapter(
    folder: str | Path,
    model_cfg: ModelConfig,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    expected_hash: str | None = None,
) -> LoRAAdapter:
    """Read and validate a PEFT adapter folder into CPU tensors of `dtype`."""
    path = Path(folder)
    raw = read_adapter_config(path)
    check_adapter_config(raw)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise AdapterError(f"no {WEIGHTS_FILE} in adapter folder (other weight formats are refused)")
    shapes = module_shapes(model_cfg)
    # Largest file a valid adapter can be (fp32, every module at max_rank, plus header room): anything
    # bigger is refused before it is read into memory.
    limit = 4 * model_cfg.num_layers * max_rank * sum(i + o for i, o in shapes.values()) + (1 << 20)
    # Hash and parse the same bytes: the file cannot change between the check and the read. The read is
    # bounded, so a file that grows (or lies about its size) cannot exhaust memory either.
    with weights_file.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise AdapterError(f"{WEIGHTS_FILE} is larger than any adapter of rank <= {max_rank} for this model")
    content_hash = hashlib.sha256(data).hexdigest()
    if expected_hash is not None and content_hash != expected_hash:
        raise AdapterError(f"adapter weights sha256 {content_hash} does not match expected {expected_hash}")
    tensors = _parse_tensors(data)
    found = _pair_tensors(tensors, shapes, model_cfg.num_layers)
    scaling, per_module = _check_and_scale(found, raw, shapes, max_rank)
    return _stack(content_hash, scaling, per_module, shapes, model_cfg.num_layers, dtype)


def _pair_tensors(
    tensors: dict[str, Tensor], shapes: dict[str, tuple[int, int]], layers: int
) -> dict[tuple[int, str], dict[str, Tensor]]:
    """(layer, module) -> {"A": tensor, "B": tensor}; every other tensor name is refused."""
    found: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"unsupported tensor {key!r} (only lora_A/lora_B of {list(LORA_MODULES)})")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in shapes:
            raise AdapterError(f"tensor {key!r} targets unsupported module {module!r}")
        if layer >= layers:
            raise AdapterError(f"tensor {key!r} targets layer {layer}; the model has {layers}")
        pair = found.setdefault((layer, module), {})
        if which in pair:
            raise AdapterError(f"tensor {key!r} duplicates another lora_{which} of layer {layer} {module}")
        pair[which] = tensor
    if not found:
        raise AdapterError("adapter holds no LoRA weights")
    return found


def _check_and_scale(
    found: dict[tuple[int, str], dict[str, Tensor]],
    raw: dict[str, Any],
    shapes: dict[str, tuple[int, int]],
    max_rank: int,
) -> tuple[float, dict[tuple[int, str], tuple[Tensor, Tensor]]]:
    """Validate each pair against the model and the config; fold per-module scale ratios into B.
    Returns the adapter's scale and (layer, module) -> (A [r, in], B [out, r]) in float32."""
    base_r, base_alpha = float(raw["r"]), float(raw["lora_alpha"])
    use_rslora = bool(raw.get("use_rslora", False))
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}

    def scaling_of(r: float, alpha: float) -> float:
        return alpha / math.sqrt(r) if use_rslora else alpha / r

    global_scaling = scaling_of(base_r, base_alpha)
    per_module: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    for (layer, module), pair in found.items():
        name = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{name}: lora_A and lora_B must both be present")
        a, b = pair["A"], pair["B"]
        d_in, d_out = shapes[module]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape != (d_out, r) or r <= 0:
            raise AdapterError(
                f"{name}: shapes A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                f"[r, {d_in}] / [{d_out}, r] of the base model"
            )
        if r > max_rank:
            raise AdapterError(f"{name}: rank {r} exceeds max_lora_rank {max_rank}")
        module_path = _module_path(layer, module)
        expected_r = _pattern_value(rank_pattern, module_path, base_r)
        if r != int(expected_r):
            raise AdapterError(f"{name}: rank {r} disagrees with adapter_config ({int(expected_r)})")
        alpha = _pattern_value(alpha_pattern, module_path, base_alpha)
        ratio = scaling_of(r, alpha) / global_scaling
        a32, b32 = a.float(), b.float()
        if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
            raise AdapterError(f"{name}: weights hold NaN or infinity")
        per_module[(layer, module)] = (a32, b32 * ratio if ratio != 1.0 else b32)
    return global_scaling, per_module


def _stack(
    content_hash: str,
    scaling: float,
    per_module: dict[tuple[int, str], tuple[Tensor, Tensor]],
    shapes: dict[str, tuple[int, int]],
    layers: int,
    dtype: torch.dtype,
) -> LoRAAdapter:
    """Per module, stack the layers into A [L, r_m, in] / B [L, out, r_m], zeros where a layer is skipped."""
    module_rank: dict[str, int] = {}
    for (_, module), (a32, _) in per_module.items():
        module_rank[module] = max(module_rank.get(module, 0), a32.shape[0])
    a_out: dict[str, Tensor] = {}
    b_out: dict[str, Tensor] = {}
    for module, r_max in module_rank.items():
        d_in, d_out = shapes[module]
        a_out[module] = torch.zeros(layers, r_max, d_in, dtype=dtype)
        b_out[module] = torch.zeros(layers, d_out, r_max, dtype=dtype)
    ranks = torch.zeros(layers, len(MODULE_GROUPS), dtype=torch.int32)
    group_of = {m: g for g, group in enumerate(MODULE_GROUPS) for m in group}
    for (layer, module), (a32, b32) in per_module.items():
        r = a32.shape[0]
        a_out[module][layer, :r] = a32.to(dtype)
        b_out[module][layer, :, :r] = b32.to(dtype)
        g = group_of[module]
        ranks[layer, g] = max(int(ranks[layer, g]), r)
    return LoRAAdapter(
        content_hash=content_hash,
        rank=max(module_rank.values()),
        scaling=scaling,
        a=a_out,
        b=b_out,
        ranks=ranks,
    )


def _parse_tensors(data: bytes) -> dict[str, Tensor]:
    try:
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise AdapterError(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc
    for key, t in tensors.items():
        if t.dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"tensor {key!r} has dtype {t.dtype}; expected a float type")
    return tensors


class LoRASlots:
    """The device-resident adapter slots: every module's A/B stacked over slots, padded to max_rank.

    Padding with zeros keeps the math exact, and a module an adapter does not target is all zeros with
    rank 0, so adapters with different ranks and target sets share one batch.
    """

    def __init__(
        self, cfg: ModelConfig, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        layers, s, r = cfg.num_layers, num_slots, max_rank
        self.a: dict[str, Tensor] = {}
        self.b: dict[str, Tensor] = {}
        for module, (d_in, d_out) in module_shapes(cfg).items():
            self.a[module] = torch.zeros(layers, s, r, d_in, dtype=dtype, device=device)  # [L, S, R, in]
            self.b[module] = torch.zeros(layers, s, d_out, r, dtype=dtype, device=device)  # [L, S, out, R]
        self.scales = torch.zeros(s, dtype=torch.float32, device=device)  # [S]
        self.ranks = torch.zeros(layers, len(MODULE_GROUPS), s, dtype=torch.int32, device=device)  # [L, G, S]
        # Host copy of `ranks`, so a step can tell which launches it needs without a device sync.
        self.host_ranks = torch.zeros(layers, len(MODULE_GROUPS), s, dtype=torch.int32)
        # On CUDA, slot writes run on a side stream so that loading never stalls the running batch.
        self._stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def active_groups(self, slots: list[int]) -> list[list[bool]]:
        """[L][G]: does any of these slots have a non-zero rank in group g of layer l?"""
        if not slots:
            return [[False] * self.host_ranks.shape[1] for _ in range(self.host_ranks.shape[0])]
        return (self.host_ranks[:, :, slots].amax(dim=-1) > 0).tolist()  # type: ignore[no-any-return]

    def write(self, slot: int, adapter: LoRAAdapter) -> Any:
        """Copy `adapter` into `slot`. Returns a CUDA event to check before use, or None when done."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
        self.host_ranks[:, :, slot] = adapter.ranks
        if self._stream is None:
            self._write(slot, adapter)
            return None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self._write(slot, adapter)
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        for module in self.a:
            self.a[module][:, slot].zero_()
            self.b[module][:, slot].zero_()
            if module in adapter.a:
                r = adapter.a[module].shape[1]
                self.a[module][:, slot, :r].copy_(adapter.a[module], non_blocking=True)
                self.b[module][:, slot, :, :r].copy_(adapter.b[module], non_blocking=True)
        self.ranks[:, :, slot].copy_(adapter.ranks, non_blocking=True)
        self.scales[slot] = adapter.scaling


def pin_adapter(adapter: LoRAAdapter) -> LoRAAdapter:
    """Page-locked copies, so CPU->GPU copies can run asynchronously (CUDA hosts only)."""
    if not torch.cuda.is_available():
        return adapter
    adapter.a = {m: t.pin_memory() for m, t in adapter.a.items()}
    adapter.b = {m: t.pin_memory() for m, t in adapter.b.items()}
    adapter.ranks = adapter.ranks.pin_memory()
    return adapter
