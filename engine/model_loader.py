"""A Hugging Face model folder -> our config, our model (weights from safetensors only) and its tokenizer.

Only the tokenizer comes from transformers; the network is ours (engine/models/). Weights are read with
safetensors, never torch.load, so a model folder cannot run code on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine import quant
from engine.config import EngineConfig
from engine.model_config import FULL, SLIDING, ModelConfig
from engine.models import MODEL_REGISTRY
from engine.models.rope import ROPE_TYPES, inv_freq_and_scale, rope_type
from engine.quant.checkpoint import ScaleCollector, module_scales, parse_scheme
from engine.tokenizer import load_tokenizer

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
_INDEX_FILE = "model.safetensors.index.json"


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """config.json contents -> ModelConfig; unsupported architectures or settings raise ValueError."""
    try:
        return _parse_config(raw)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"config.json is missing or has a malformed field: {exc!r}") from exc


def _parse_config(raw: dict[str, Any]) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ValueError("config.json must hold a JSON object")
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else raw.get("model_type", "<none>")
    if arch not in MODEL_REGISTRY:
        raise ValueError(
            f"unsupported model architecture {arch!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    family = MODEL_REGISTRY[arch]
    # Gemma names it hidden_activation (older Gemma 2 folders carry both names).
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS:
        raise ValueError(f"{arch}: unsupported hidden activation {act!r} (supported: {_ACTIVATIONS})")
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ValueError(f"{arch}: {heads} query heads are not a multiple of {kv_heads} KV heads")
    num_layers = int(raw["num_hidden_layers"])
    max_positions = int(raw.get("max_position_embeddings", 2048))
    rotary = _rotary_dim(raw, arch, head_dim)
    full_rope, local_rope = _ropes(raw, arch, rotary, max_positions)
    attention_bias = bool(raw.get("attention_bias", False))
    sliding = raw.get("sliding_window")
    fields: dict[str, Any] = {
        "architecture": arch,
        "model_type": family.model_type,
        "vocab_size": int(raw["vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(raw["intermediate_size"]),
        "num_layers": num_layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(full_rope["rope_theta"]),
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "qkv_bias": attention_bias,
        "o_bias": attention_bias,
        "mlp_bias": bool(raw.get("mlp_bias", False)),
        "rope_scaling": full_rope if full_rope["rope_type"] != "default" else None,
        "local_rope": local_rope,
        "sliding_window": int(sliding) if sliding else None,
        "layer_types": _layer_types(raw, arch, num_layers),
        "hidden_act": act,
        "rotary_dim": rotary if rotary != head_dim else None,
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_ids": _token_ids(raw.get("eos_token_id")),
    }
    fields.update(family.config(raw))
    if fields["sliding_window"] is not None and fields["sliding_window"] < 1:
        raise ValueError(f"{arch}: sliding_window must be a positive number of tokens")
    if fields["sliding_window"] is None or SLIDING not in fields["layer_types"]:
        fields["layer_types"] = ()  # every layer attends to its whole context
    return ModelConfig(**fields)


def _rotary_dim(raw: dict[str, Any], arch: str, head_dim: int) -> int:
    """How many dims of each head rotate: `partial_rotary_factor` of them (Phi-4-mini: 0.75)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    factor = float(factor if factor is not None else raw.get("partial_rotary_factor", 1.0))
    rotary = int(head_dim * factor)
    if not 0 < factor <= 1 or rotary < 2 or rotary % 2:
        raise ValueError(f"{arch}: partial_rotary_factor {factor} gives an odd or empty rotary dimension")
    return rotary


def _layer_types(raw: dict[str, Any], arch: str, num_layers: int) -> tuple[str, ...]:
    """config.json `layer_types` (transformers 5 writes it for the families that mix window and full
    layers); without it a `sliding_window` applies to every layer (Mistral, Phi-3) unless the family
    says otherwise (engine/models/)."""
    value = raw.get("layer_types")
    if value is None:
        return (SLIDING,) * num_layers
    if not isinstance(value, list) or len(value) != num_layers or not set(value) <= {FULL, SLIDING}:
        raise ValueError(
            f"{arch}: layer_types must list {FULL!r} or {SLIDING!r} for each of {num_layers} layers"
        )
    return tuple(value)


def _ropes(
    raw: dict[str, Any], arch: str, rotary_dim: int, max_positions: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(rope of the full-attention layers, rope of the sliding ones where it differs, else None), each
    {"rope_type", "rope_theta", type-specific keys}. transformers 5 writes `rope_parameters` (rope_theta
    inside, or one dict per layer type); older folders `rope_scaling` + `rope_theta` (+ Gemma 3's
    `rope_local_base_freq`)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{arch}: rope_parameters must be an object")
    theta = raw.get("rope_theta") or 10000.0
    local: dict[str, Any] | None
    if FULL in params or SLIDING in params:
        full = _rope(params.get(FULL) or {}, raw, theta, arch, rotary_dim, max_positions)
        local = _rope(params.get(SLIDING) or {}, raw, theta, arch, rotary_dim, max_positions)
    else:
        full = _rope(params, raw, theta, arch, rotary_dim, max_positions)
        local_theta = raw.get("rope_local_base_freq")
        local = None if local_theta is None else {"rope_type": "default", "rope_theta": float(local_theta)}
    return full, (local if local != full else None)


def _rope(
    rope: dict[str, Any], raw: dict[str, Any], theta: Any, arch: str, rotary_dim: int, max_positions: int
) -> dict[str, Any]:
    out = {k: v for k, v in rope.items() if k not in ("type", "partial_rotary_factor")}
    out["rope_type"] = rope_type(rope)
    out["rope_theta"] = float(rope.get("rope_theta") or theta)
    if out["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"{arch}: unsupported rope type {out['rope_type']!r} (supported: {ROPE_TYPES})")
    if out["rope_type"] == "default":
        return {"rope_type": "default", "rope_theta": out["rope_theta"]}
    if "original_max_position_embeddings" not in out and raw.get("original_max_position_embeddings"):
        out["original_max_position_embeddings"] = int(raw["original_max_position_embeddings"])
    try:
        inv_freq_and_scale(rotary_dim, out, max_positions)  # every key it needs, present and well-formed
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{arch}: bad {out['rope_type']} rope parameters: {exc!r}") from exc
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} must hold a JSON object")
    return value


def config_json(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder: no config.json")
    return _read_json(cfg_file)


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir)
    config = parse_config(config_json(path))
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        # generation_config.json often lists more stop ids than config.json (Llama 3 chat turns).
        extra = _token_ids(_read_json(gen_file).get("eos_token_id"))
        merged = tuple(dict.fromkeys(config.eos_token_ids + extra))
        config = ModelConfig(**{**config.__dict__, "eos_token_ids": merged})
    return config


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, or every *.safetensors."""
    path = Path(model_dir)
    index = path / _INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map")
        names = sorted({str(v) for v in weight_map.values()})
        files = [path / n for n in names]
        for f in files:
            # The index is data from the folder: a shard name must not walk out of it.
            if f.resolve().parent != path.resolve() or not f.is_file():
                raise ValueError(f"{index}: bad or missing shard {f.name!r}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors weights (other formats are refused: they can run code)")
    return files


def iter_weights(model_dir: str | Path) -> Any:
    """Yield (name, tensor) over every weight of the folder, one shard open at a time."""
    for f in weight_files(model_dir):
        with safe_open(str(f), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, shard.get_tensor(name)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available (use auto or cpu)")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; one of {sorted(_DTYPES)} or auto")
    return _DTYPES[dtype]


@dataclass
class LoadedModel:
    """Everything the engine needs about the base model, made once at start."""

    name: str
    path: str
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    # "fp8" when the projections hold FP8 weights (quantized at load or an FP8 checkpoint), else None.
    quantization: str | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = self.config.eos_token_ids
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        return ids if tok_eos is None or tok_eos in ids else (*ids, tok_eos)


def load_model(config: EngineConfig) -> LoadedModel:
    """Build our model for `config.model`, load its weights on the target device and dtype."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model_config = load_config(config.model)
    model_cls = MODEL_REGISTRY[model_config.architecture].model
    scheme = parse_scheme(config_json(config.model))
    collector = ScaleCollector()
    weights = iter_weights(config.model)
    if scheme is not None:
        # Scales go to the collector; FP8 weights reach the model exactly (e4m3 fits every float dtype).
        weights = collector.weights(weights)
    model = model_cls.from_weights(model_config, weights, dtype=dtype, device=device)
    scales = None if scheme is None else module_scales(collector, model_config, scheme)
    quant.prepare(
        model,
        quantize=config.quantization == "fp8",
        checkpoint_scales=scales,
        deterministic=config.deterministic,
        device=device,
        dtype=dtype,
    )
    fp8 = scheme is not None or config.quantization == "fp8"
    return LoadedModel(
        name=Path(config.model).resolve().name,
        path=str(config.model),
        config=model_config,
        model=model,
        tokenizer=load_tokenizer(config.model),
        device=device,
        dtype=dtype,
        quantization="fp8" if fp8 else None,
    )
