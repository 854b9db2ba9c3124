"""Phi-3 and Phi-4 (Phi3ForCausalLM): Llama's layer with q/k/v and gate/up stored fused in the checkpoint
(`qkv_proj`, `gate_up_proj`, which is our layout already) and LongRoPE ("su") for the long-context
variants. Adapters trained on the fused modules are split per projection at load (engine/lora.py)."""

from __future__ import annotations

from typing import Any

from engine.models.family import Family


def _phi3(raw: dict[str, Any]) -> dict[str, Any]:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    factor = float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    if factor != 1.0:
        raise ValueError(f"Phi3ForCausalLM: partial_rotary_factor {factor} is not supported (only 1.0)")
    return {}


PHI3 = Family("phi3", _phi3)
