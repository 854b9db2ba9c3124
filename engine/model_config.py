"""What our model code needs from a model's config.json (parsed by engine/model_loader.py).

Its own module so that model code (engine/models/) and the loader that builds models do not import each
other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class ModelConfig:
    """What our model code needs from config.json, with each family's defaults made explicit."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # {"rope_type": "llama3" | "linear" | "yarn" | "longrope", "factor": ..., ...}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    # Window (in tokens, the query's own included) of the layers whose type is SLIDING; None = none.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # config.json `model_type`: keys the adapter-format contract (engine/adapter_format.py TARGET_MODULES).
    model_type: str = "llama"
    # FULL or SLIDING per layer; empty = every layer FULL.
    layer_types: tuple[str, ...] = ()
    # Rope of the SLIDING layers where it differs from the others' (Gemma 3's local base), same keys.
    local_rope: dict[str, Any] | None = None
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma)
    qk_norm: bool = False  # RMSNorm of each q and k head before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w): 1.0 here, folded in at load
    sandwich_norm: bool = False  # Gemma 2/3: norms after attention and MLP too (four per layer)
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    # Phi-4-mini rotates only the first `rotary_dim` dims of each head (None = all of them); see rope.py.
    rotary_dim: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def window_of(self, layer: int) -> int | None:
        """The attention window of `layer` in tokens (None = full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != SLIDING:
            return None
        return self.sliding_window

    def rope_of(self, layer: int) -> dict[str, Any]:
        """The rope dict of `layer` (rope_type, rope_theta and the type's keys)."""
        if self.local_rope is not None and self.layer_types and self.layer_types[layer] == SLIDING:
            return self.local_rope
        return {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
