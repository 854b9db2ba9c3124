"""What our model code needs from a model's config.json (parsed by engine/model_loader.py).

Its own module so that model code (engine/models/) and the loader that builds models do not import each
other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # {"rope_type": "llama3" | "linear", "factor": ..., ...}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    # Mistral v0.1 declares one; our attention is full, so max_position_embeddings is capped to it.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim
