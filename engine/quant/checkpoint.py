"""FP8 checkpoints as llm-compressor writes them (compressed-tensors, `float-quantized`).

config.json carries `quantization_config` = {"quant_method": "compressed-tensors", "format": "float-quantized",
"config_groups": {name: {"targets": [...], "weights": {...}, "input_activations": {...} | null}},
"ignore": [...], "kv_cache_scheme": null}; every quantized Linear stores `weight` in float8_e4m3fn, a
float32/bf16 `weight_scale` ([O, 1] for strategy "channel", one value for "tensor"), and with static
activations an `input_scale` (one value). The fields are parsed here rather than with the
`compressed-tensors` package: we need a dozen documented keys, and the package brings transformers,
pydantic and loguru into the engine process (and is not in the GPU image).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from engine.model_config import ModelConfig
from engine.models.rope import head_rows_perm

_SCALE_SUFFIXES = (".weight_scale", ".input_scale")
_UNSUPPORTED_SUFFIXES = (".weight_zero_point", ".input_zero_point", ".weight_g_idx", ".weight_packed")


@dataclass(frozen=True)
class Fp8Scheme:
    """What an FP8 checkpoint says about its Linear layers."""

    weight_strategy: str  # "tensor" or "channel"
    activations: str  # "dynamic" (per token at run time), "static" (an input_scale per layer) or "none"
    ignore: tuple[str, ...] = ()  # module names (or "re:" patterns) left in float


def _fail(message: str) -> ValueError:
    return ValueError(f"config.json quantization_config: {message}")


def parse_scheme(raw: dict[str, Any]) -> Fp8Scheme | None:
    """config.json contents -> the FP8 scheme, None without a quantization_config; ValueError for any
    quantization we do not run (the message names the field)."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise _fail("must be an object")
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise _fail(f"quant_method {method!r} is not supported (only 'compressed-tensors' FP8)")
    fmt = qc.get("format")
    if fmt != "float-quantized":
        raise _fail(f"format {fmt!r} is not supported (only 'float-quantized')")
    if qc.get("kv_cache_scheme") is not None:
        raise _fail("kv_cache_scheme is not supported (the KV cache stays in the model dtype)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _fail("config_groups must be a non-empty object")
    schemes = {_parse_group(str(name), group) for name, group in groups.items()}
    if len(schemes) != 1:
        raise _fail("config_groups with different schemes are not supported")
    strategy, activations = schemes.pop()
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise _fail("ignore must be a list of module names")
    return Fp8Scheme(strategy, activations, tuple(ignore))


def _parse_group(name: str, group: Any) -> tuple[str, str]:
    if not isinstance(group, dict):
        raise _fail(f"config_groups.{name} must be an object")
    targets = group.get("targets") or []
    if not all(t == "Linear" or (isinstance(t, str) and t.startswith("re:")) for t in targets):
        raise _fail(f"config_groups.{name}.targets {targets!r}: only 'Linear' or 're:' patterns")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise _fail(f"config_groups.{name}.weights must be an object")
    _check_fp8(weights, f"config_groups.{name}.weights")
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel") or weights.get("dynamic"):
        raise _fail(f"config_groups.{name}.weights.strategy {strategy!r}: only static 'tensor' or 'channel'")
    acts = group.get("input_activations")
    if acts is None:
        return strategy, "none"
    if not isinstance(acts, dict):
        raise _fail(f"config_groups.{name}.input_activations must be an object or null")
    _check_fp8(acts, f"config_groups.{name}.input_activations")
    if acts.get("dynamic"):
        if acts.get("strategy") not in ("token", "tensor"):
            raise _fail(f"config_groups.{name}.input_activations.strategy {acts.get('strategy')!r}")
        return strategy, "dynamic"
    if acts.get("strategy") != "tensor":
        raise _fail(f"config_groups.{name}.input_activations: static scales must be per tensor")
    return strategy, "static"


def _check_fp8(args: dict[str, Any], where: str) -> None:
    if args.get("num_bits") != 8 or args.get("type") != "float" or args.get("symmetric") is False:
        raise _fail(f"{where}: only symmetric 8-bit float (FP8 e4m3) is supported")
    if args.get("group_size") or args.get("block_structure"):
        raise _fail(f"{where}: group and block scales are not supported")


@dataclass
class ScaleCollector:
    """Takes the scale tensors out of a checkpoint's weight stream (the model loader only knows weights)."""

    scales: dict[str, Tensor] = field(default_factory=dict)  # HF names -> float32 tensors
    fp8_weights: set[str] = field(default_factory=set)  # HF names of the weights stored in FP8

    def weights(self, stream: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in stream:
            if name.endswith(_UNSUPPORTED_SUFFIXES):
                raise ValueError(f"{name}: asymmetric, grouped or packed quantization is not supported")
            if name.endswith(_SCALE_SUFFIXES):
                self.scales[name] = tensor.float()
            else:
                if tensor.dtype == torch.float8_e4m3fn:
                    self.fp8_weights.add(name)
                yield name, tensor


@dataclass(frozen=True)
class ModuleScales:
    """One of our (possibly fused) projections' scales from the checkpoint."""

    weight: Tensor  # [O] float32, one per output row
    input: Tensor | None  # [1] float32 static activation scale, None = dynamic


# Our fused projection -> its checkpoint parts and their output widths.
def _parts(cfg: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    return {
        "self_attn.qkv_proj": (("q_proj", cfg.q_size), ("k_proj", cfg.kv_size), ("v_proj", cfg.kv_size)),
        "self_attn.o_proj": (("o_proj", cfg.hidden_size),),
        "mlp.gate_up_proj": (("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size)),
        "mlp.down_proj": (("down_proj", cfg.hidden_size),),
    }


def module_scales(collected: ScaleCollector, cfg: ModelConfig, scheme: Fp8Scheme) -> dict[str, ModuleScales]:
    """Checkpoint scales -> {our module name ("layers.3.mlp.down_proj"): its scales}. A module missing here
    was not quantized (the checkpoint's ignore list) and stays in float."""
    scales = dict(collected.scales)
    out: dict[str, ModuleScales] = {}
    for layer in range(cfg.num_layers):
        for ours, parts in _parts(cfg).items():
            block = f"model.layers.{layer}.{ours.split('.')[0]}"
            fused = f"{block}.{ours.split('.')[1]}"
            if f"{fused}.weight_scale" in scales:  # stored fused (Phi-3)
                named = [(fused, sum(w for _, w in parts))]
            else:
                named = [(f"{block}.{p}", w) for p, w in parts]
            present = [f"{n}.weight_scale" in scales for n, _ in named]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"{fused}: its parts must be all quantized or none (fused at load)")
            for n, _ in named:
                if f"{n}.weight" not in collected.fp8_weights:
                    raise ValueError(f"{n}.weight has a weight_scale but is not stored in float8_e4m3fn")
            rows = torch.cat([_rows(scales.pop(f"{n}.weight_scale"), w, n) for n, w in named])
            inputs = [scales.pop(f"{n}.input_scale", None) for n, _ in named]
            static = None  # dynamic schemes: any input_scale in the file is not used
            if scheme.activations == "static":
                found = [i.reshape(()) for i in inputs if i is not None]
                if len(found) != len(inputs):
                    raise ValueError(f"{fused}: static activation scheme but no input_scale")
                # One input feeds the fused product: the largest part's scale clips none of them.
                static = torch.stack(found).max()
            if ours == "self_attn.qkv_proj" and cfg.rotary_dim not in (None, cfg.head_dim):
                rows = rows[_rotary_rows(cfg)]  # the weight rows were reordered the same way at load
            out[f"layers.{layer}.{ours}"] = ModuleScales(rows, None if static is None else static.reshape(1))
    leftover = sorted(scales)
    if leftover:
        raise ValueError(f"scales for modules we do not quantize: {leftover[:5]}")
    return out


def _rows(scale: Tensor, width: int, name: str) -> Tensor:
    """A checkpoint's weight_scale (one value, or [O] / [O, 1]) -> [O] float32."""
    if scale.numel() == 1:
        return scale.reshape(1).expand(width).float()
    if scale.numel() != width:
        raise ValueError(f"{name}.weight_scale has {scale.numel()} values for {width} output rows")
    return scale.reshape(width).float()


def _rotary_rows(cfg: ModelConfig) -> Tensor:
    """The row order engine/models/causal_lm.py gives q and k under partial rotary (v unchanged)."""
    assert cfg.rotary_dim is not None
    q_rows = head_rows_perm(cfg.num_heads, cfg.head_dim, cfg.rotary_dim)
    k_rows = head_rows_perm(cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim) + cfg.q_size
    v_rows = torch.arange(cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
    return torch.cat((q_rows, k_rows, v_rows))
