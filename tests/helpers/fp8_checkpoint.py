"""FP8 checkpoints as llm-compressor writes them (compressed-tensors, float-quantized), made from a tiny
float model in tests, and the float model built from their dequantized weights (the oracle's input).

The quantization here is written out on its own (numpy-free torch, not the engine's kernels/fp8.py), so a
wrong engine quantizer cannot agree with it by construction.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# Per-projection names, and Phi-3's fused ones.
PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
)  # fmt: skip


def _is_projection(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS


def _quantize(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, scale [O, 1] for channel or [1] for tensor)."""
    if strategy == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    else:
        scale = w.abs().amax().reshape(1) / 448.0
    q = (w / scale.reshape(-1, 1) if strategy == "channel" else w / scale).clamp(-448, 448)
    return q.to(torch.float8_e4m3fn), scale.float()


def scheme_config(strategy: str, activations: str, ignore: list[str] | None = None) -> dict[str, Any]:
    """quantization_config of config.json: weights `strategy` (tensor | channel), activations dynamic |
    static | none."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
    acts: dict[str, Any] | None
    if activations == "none":
        acts = None
    elif activations == "dynamic":
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    else:
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts},
        },
        "ignore": ignore if ignore is not None else ["lm_head"],
        "kv_cache_scheme": None,
    }


def write_fp8_checkpoint(
    float_dir: Path, out_dir: Path, strategy: str = "channel", activations: str = "dynamic"
) -> Path:
    """An FP8 copy of `float_dir` (single-file safetensors): every decoder projection quantized, lm_head
    and embeddings left in float; static activations get an input_scale per projection."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(float_dir.glob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            if not _is_projection(name):
                tensors[name] = t
                continue
            q, scale = _quantize(t.float(), strategy)
            tensors[name] = q
            tensors[name.replace(".weight", ".weight_scale")] = scale
            if activations == "static":
                tensors[name.replace(".weight", ".input_scale")] = torch.tensor([0.02])
    save_file(tensors, str(out_dir / "model.safetensors"))
    for extra in float_dir.iterdir():
        if (
            extra.suffix != ".safetensors"
            and extra.name != "model.safetensors.index.json"
            and extra.is_file()
        ):
            shutil.copy(extra, out_dir / extra.name)
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = scheme_config(strategy, activations)
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


def write_dequantized(fp8_dir: Path, out_dir: Path) -> Path:
    """The float32 model whose projections are the FP8 checkpoint's weights times their scales."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = load_file(str(fp8_dir / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith((".weight_scale", ".input_scale")):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = raw[name.replace(".weight", ".weight_scale")].float()
            t = t.float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)
        tensors[name] = t.contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"))
    for extra in fp8_dir.iterdir():
        if extra.suffix != ".safetensors" and extra.is_file():
            shutil.copy(extra, out_dir / extra.name)
    config = json.loads((fp8_dir / "config.json").read_text())
    config.pop("quantization_config")
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir
