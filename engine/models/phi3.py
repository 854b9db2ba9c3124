"""Phi-3 and Phi-4 (Phi3ForCausalLM): Llama's layer with q/k/v and gate/up stored fused in the checkpoint
(`qkv_proj`, `gate_up_proj`, which is our layout already), LongRoPE ("su") for the long-context
variants; Phi-4-mini's partial rotary is the loader's `partial_rotary_factor` (engine/models/rope.py). Adapters trained on the fused modules are split per projection at load (engine/lora.py)."""

from __future__ import annotations

from engine.models.family import Family

PHI3 = Family("phi3")
