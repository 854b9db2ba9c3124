"""The adapter format we serve, as one contract for upload validation (app/) and the engine's loader.

A PEFT LoRA adapter is two files: `adapter_config.json` and `adapter_model.safetensors`. This module says
which configs are accepted (the keys the engine computes exactly, each value in a sane range), which
projections each architecture lets an adapter target, what the tensors are named and what rank each
(layer, module) has. It imports neither torch nor numpy: the app, which never imports torch, runs the
same checks at upload that the engine runs at load, so an adapter that uploads also loads (but for
weights that overflow once narrowed to the serving dtype, which only the engine sees).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20

# The architectures the engine runs, and the projections it can put a LoRA on in each of them.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTENTION_MODULES + MLP_MODULES
# Phi-3 stores q/k/v and gate/up fused, so PEFT trains one LoRA on each fused module; the engine splits
# it per projection at load (the same A for each part, B cut by rows: engine/lora.py).
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# Keyed by config.json `model_type` (engine/models/ registers each architecture with one).
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": LORA_MODULES,
    "mistral": LORA_MODULES,
    "qwen2": LORA_MODULES,
    "qwen3": LORA_MODULES,
    "gemma2": LORA_MODULES,
    "gemma3_text": LORA_MODULES,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
_IN_ATTENTION = frozenset({*ATTENTION_MODULES, "qkv_proj"})
# Other families' projection names: an adapter naming one was trained for another architecture.
OTHER_ARCH_MODULES = frozenset(
    {"c_attn", "c_proj", "c_fc", "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "Wqkv"}
    | {m for targets in TARGET_MODULES.values() for m in targets}
)

# lora_alpha (and each alpha_pattern value), and the scale each module ends up with. Real adapters use
# alphas of 1..512; values far outside make no sense and overflow half-precision math at serving time.
MAX_LORA_ALPHA = 1e4
SCALING_RANGE = (1e-4, 1e4)
# rank_pattern / alpha_pattern: PEFT's keys are module names or paths, which the loader matches as PEFT
# does (a regular expression against the end of each module path). Only names and paths are accepted, so
# a tenant's pattern cannot make that matching slow; and only so many of them.
_PATTERN_KEY = re.compile(r"[A-Za-z0-9_.]{1,200}")
MAX_PATTERN_ENTRIES = 1024

# PEFT's saved names for a causal LM: base_model.model.<HF module path>.lora_{A,B}.weight.
_TENSOR_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(0|[1-9][0-9]{0,5})\."
    r"(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv_proj|gate_up_proj)"
    r"\.lora_(A|B)\.weight"
)

# Keys that change the forward pass in ways the engine does not compute: refused when set to anything
# but their inactive default, each by name.
REFUSED_WHEN_ACTIVE = {
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
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
_READ = {
    "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules", "bias", "rank_pattern",
    "alpha_pattern", "layers_to_transform",
}  # fmt: skip
# Training-time or bookkeeping options that do not change inference.
_HARMLESS = {
    "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying",
}  # fmt: skip


class AdapterError(ValueError):
    """An adapter that cannot be served; the message says why, `code` names the reason for machines and
    `field` the file at fault ("adapter_config" or "weights"). The engine raises it at load; the app
    turns it into a 4xx at upload."""

    def __init__(self, message: str, code: str = "invalid_adapter", field: str = "weights") -> None:
        super().__init__(message)
        self.code = code
        self.field = field


def config_error(code: str, message: str) -> AdapterError:
    return AdapterError(message, code, "adapter_config")


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """What the engine computes from adapter_config.json: every value checked."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # in LORA_MODULES order
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers: tuple[int, ...] | None = None  # layers_to_transform; None = every layer
    warnings: tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        """The adapter's own scale: alpha / r (alpha / sqrt(r) with rsLoRA)."""
        return _scaling(self.alpha, self.rank, self.use_rslora)

    def rank_of(self, layer: int, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path(layer, module), self.rank))

    def alpha_of(self, layer: int, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_path(layer, module), self.alpha))

    def scaling_of(self, layer: int, module: str) -> float:
        return _scaling(self.alpha_of(layer, module), self.rank_of(layer, module), self.use_rslora)

    def transforms(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


def module_dims(module: str, hidden: int, q_width: int, kv_width: int, intermediate: int) -> tuple[int, int]:
    """(in_features, out_features) of a LoRA-capable projection, fused ones included."""
    dims = {
        "q_proj": (hidden, q_width),
        "k_proj": (hidden, kv_width),
        "v_proj": (hidden, kv_width),
        "o_proj": (q_width, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
        "qkv_proj": (hidden, q_width + 2 * kv_width),
        "gate_up_proj": (hidden, 2 * intermediate),
    }
    return dims[module]


def module_path(layer: int, module: str) -> str:
    """The module's path in the Hugging Face model, which rank_pattern / alpha_pattern keys match."""
    return f"model.layers.{layer}.{'self_attn' if module in _IN_ATTENTION else 'mlp'}.{module}"


def tensor_name(layer: int, module: str, side: str) -> str:
    return f"base_model.model.{module_path(layer, module)}.lora_{side}.weight"


def parse_tensor_name(name: str, num_layers: int) -> tuple[int, str, str]:
    """(layer, module, "A" | "B") of one of PEFT's saved tensor names; AdapterError for anything else."""
    match = _TENSOR_NAME.fullmatch(name)
    if match is None:
        if "lora_magnitude_vector" in name:
            raise AdapterError(
                f"tensor '{name[:200]}' is a DoRA magnitude; DoRA is not supported", "use_dora_refused"
            )
        raise AdapterError(
            f"tensor '{name[:200]}' is not a LoRA A/B of a supported projection "
            f"({', '.join(LORA_MODULES + tuple(FUSED_MODULES))})",
            "unexpected_tensor",
        )
    layer, parent, module, side = int(match[1]), match[2], match[3], match[4]
    if (parent == "self_attn") != (module in _IN_ATTENTION):
        raise AdapterError(f"tensor '{name[:200]}' puts {module} under {parent}", "unexpected_tensor")
    if layer >= num_layers:
        raise AdapterError(
            f"tensor '{name[:200]}' is for layer {layer} but the base model has {num_layers} layers",
            "wrong_architecture",
        )
    return layer, module, side


def parse_config_json(raw: bytes) -> dict[str, Any]:
    """adapter_config.json's bytes -> its object: UTF-8 JSON, no duplicate keys, no NaN/Infinity."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise config_error("config_too_large", f"{len(raw)} bytes; at most {MAX_CONFIG_BYTES} are accepted")
    try:
        parsed = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except AdapterError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise config_error("malformed_config", "not valid JSON (UTF-8, no duplicate keys)") from None
    if not isinstance(parsed, dict):
        raise config_error("malformed_config", "must be a JSON object")  # or a bare NaN or list of them
    return parsed


def check_lora_config(
    config: dict[str, Any], max_rank: int, model_type: str | None = None, num_layers: int | None = None
) -> LoraConfig:
    """Validate a parsed adapter_config.json: the keys the engine computes, each value in range.
    model_type None = any architecture the engine runs; num_layers None = layers are not checked."""
    if config.get("peft_type") != "LORA":
        raise config_error(
            "unsupported_peft_type", f"peft_type must be LORA, got {_show(config.get('peft_type'))}"
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise config_error(
            "unsupported_task_type", f"task_type must be CAUSAL_LM, got {_show(config['task_type'])}"
        )
    if config.get("bias", "none") != "none":
        raise config_error("bias_refused", f"bias must be 'none', got {_show(config.get('bias'))}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise config_error("malformed_config", "use_rslora must be true or false")
    for key, reason in REFUSED_WHEN_ACTIVE.items():
        if config.get(key) not in (None, False, "", [], {}, 0):
            raise config_error(f"{key}_refused", reason)
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        raise config_error("malformed_config", f"missing required key(s): {', '.join(missing)}")
    rank = _rank("r", config["r"], max_rank)
    alpha = _alpha("lora_alpha", config["lora_alpha"])
    _check_scaling("lora_alpha", alpha, rank, use_rslora)
    rank_pattern = {
        k: _rank(f"rank_pattern[{k!r}]", v, max_rank) for k, v in _pattern(config, "rank_pattern")
    }
    alpha_pattern = {k: _alpha(f"alpha_pattern[{k!r}]", v) for k, v in _pattern(config, "alpha_pattern")}
    known = _READ | set(REFUSED_WHEN_ACTIVE) | _HARMLESS
    warnings = tuple(
        f"adapter_config: unknown key '{key[:100]}' ignored" for key in config if key not in known
    )
    spec = LoraConfig(
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=_targets(config["target_modules"], model_type),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers=_layers(config.get("layers_to_transform"), num_layers),
        warnings=warnings[:20],
    )
    if rank_pattern or alpha_pattern:
        # Keys may match different modules, so a module can pair any rank with any alpha: the scale
        # grows with alpha and shrinks with rank, and the extremes bound every pair.
        ranks, alphas = [rank, *rank_pattern.values()], [alpha, *alpha_pattern.values()]
        _check_scaling("alpha_pattern", min(alphas), max(ranks), use_rslora)
        _check_scaling("alpha_pattern", max(alphas), min(ranks), use_rslora)
    return spec


def _scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def _check_scaling(name: str, alpha: float, rank: int, use_rslora: bool) -> None:
    scaling = _scaling(alpha, rank, use_rslora)
    low, high = SCALING_RANGE
    if not low <= scaling <= high:
        raise config_error(
            "invalid_scaling",
            f"{name}: the scale alpha/{'sqrt(r)' if use_rslora else 'r'} = {scaling:.3g} is outside [{low:g}, {high:g}]",
        )


def _show(value: Any) -> str:
    return repr(value)[:40]


def _rank(name: str, value: Any, max_rank: int) -> int:
    # A JSON integer can be any size: compared as an int, never converted to a float first.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise config_error("invalid_rank", f"{name} must be a positive integer, got {_show(value)}")
    if value > max_rank:
        raise config_error(
            "rank_too_high",
            f"{name}={_show(value)} exceeds max_lora_rank {max_rank}, this server's largest LoRA rank",
        )
    return value


def _alpha(name: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    # Range first: an int beyond a float's range (10**400) must not reach float() or math.isfinite.
    if not ok or not 0 < value <= MAX_LORA_ALPHA or not math.isfinite(value):
        raise config_error(
            "invalid_alpha", f"{name} must be a finite number in (0, {MAX_LORA_ALPHA:g}], got {_show(value)}"
        )
    return float(value)


def _pattern(config: dict[str, Any], key: str) -> list[tuple[str, Any]]:
    value = config.get(key)
    if value is None:
        return []
    if not isinstance(value, dict):
        raise config_error("malformed_config", f"{key} must map module names to values")
    if len(value) > MAX_PATTERN_ENTRIES:
        raise config_error(
            "malformed_config", f"{key} has {len(value)} entries; at most {MAX_PATTERN_ENTRIES}"
        )
    for name in value:
        if not _PATTERN_KEY.fullmatch(name):
            raise config_error(
                "unsupported_pattern",
                f"{key} key {name[:100]!r} is not a module name or path (letters, digits, '_' and '.')",
            )
    return list(value.items())


def _targets(value: Any, model_type: str | None) -> tuple[str, ...]:
    allowed = TARGET_MODULES.get(model_type or "", LORA_MODULES)
    if value == "all-linear":
        # PEFT's shorthand for every linear layer but the output head: all of them here.
        return allowed
    if isinstance(value, str):
        # A single string is a regular expression to PEFT; we accept only a plain module name.
        value = [value]
    if not isinstance(value, list) or not value:
        raise config_error(
            "unsupported_target_module", "target_modules must be a non-empty list of module names"
        )
    chosen = set()
    for entry in value:
        if not isinstance(entry, str):
            raise config_error("unsupported_target_module", "target_modules must hold module names (strings)")
        if entry not in allowed:
            code = "wrong_architecture" if entry in OTHER_ARCH_MODULES else "unsupported_target_module"
            hint = ""
            if entry in FUSED_MODULES and model_type != "phi3":
                hint = f" (a fused {entry} is Phi-3's; this model's are {', '.join(FUSED_MODULES[entry])})"
            elif model_type == "phi3" and entry in LORA_MODULES:
                fused = next((f for f, parts in FUSED_MODULES.items() if entry in parts), None)
                hint = f" (Phi-3 fuses it into {fused})" if fused else ""
            raise config_error(
                code,
                f"target module '{entry[:100]}' is not a projection of this {model_type or 'model'}{hint}; "
                f"supported: {', '.join(allowed)}",
            )
        chosen.add(entry)
    return tuple(m for m in allowed if m in chosen)


def _layers(value: Any, num_layers: int | None) -> tuple[int, ...] | None:
    if value is None or value == []:
        return None
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, list)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
        or len(set(values)) != len(values)
    ):
        raise config_error(
            "malformed_config", "layers_to_transform must be a layer index or a list of distinct ones"
        )
    if num_layers is not None and max(values) >= num_layers:
        raise config_error(
            "wrong_architecture",
            f"layers_to_transform names layer {max(values)}; the base model has {num_layers}",
        )
    return tuple(sorted(values))


def _pattern_value(pattern: dict[str, Any], path: str, default: float) -> float:
    """PEFT's rule: the first key that matches the end of the module path at a name boundary wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return float(value)
    return default


class _NonJson:
    """NaN / Infinity / -Infinity where a value should be: refused by the object holding it, by key."""

    def __init__(self, name: str) -> None:
        self.name = name


def _non_json_in(value: Any) -> _NonJson | None:
    if isinstance(value, _NonJson):
        return value
    if isinstance(value, list):
        return next((found for v in value if (found := _non_json_in(v)) is not None), None)
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two values for one key would let the checker and the loader read different ones.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise config_error("malformed_config", f"key '{key[:100]}' appears twice")
        if (constant := _non_json_in(value)) is not None:
            raise config_error("malformed_config", f"{key[:100]}: {constant.name} is not a JSON number")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    return _NonJson(name)
