"""Gemma 2 and Gemma 3 text models.

Both: embeddings scaled by sqrt(hidden_size), (1 + w) RMSNorms (the 1 is added at load), four norms per
layer (sandwich), tanh-approximated GELU in the MLP, attention scaled by `query_pre_attn_scalar`, local
(sliding-window) and global layers from `layer_types`. Gemma 2 soft-caps attention scores and the final
logits; Gemma 3 norms q and k per head instead and gives its local layers their own rope base.
"""

from __future__ import annotations

from typing import Any

from engine.model_config import FULL, SLIDING
from engine.models.family import Family


def _gemma(raw: dict[str, Any], every: int) -> dict[str, Any]:
    """`every`: without `layer_types`, every `every`-th layer is global, the others local."""
    if raw.get("use_bidirectional_attention"):
        raise ValueError("Gemma: use_bidirectional_attention (embedding models) is not a causal LM")
    scalar = raw.get("query_pre_attn_scalar")
    layers = int(raw["num_hidden_layers"])
    types = raw.get("layer_types") or [SLIDING if (i + 1) % every else FULL for i in range(layers)]
    return {
        "layer_types": tuple(types),
        "norm_offset": 1.0,
        "sandwich_norm": True,
        "scale_embeddings": True,
        "query_pre_attn_scalar": float(scalar) if scalar else None,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", True)),
    }


def _softcaps(raw: dict[str, Any]) -> dict[str, Any]:
    attn, final = raw.get("attn_logit_softcapping"), raw.get("final_logit_softcapping")
    return {
        "attn_logit_softcap": float(attn) if attn else None,
        "final_logit_softcap": float(final) if final else None,
    }


def _gemma2(raw: dict[str, Any]) -> dict[str, Any]:
    return {**_gemma(raw, 2), **_softcaps(raw)}


def _gemma3(raw: dict[str, Any]) -> dict[str, Any]:
    every = int(raw.get("sliding_window_pattern", 6))
    return {**_gemma(raw, every), **_softcaps(raw), "qk_norm": True}


GEMMA2 = Family("gemma2", _gemma2)
GEMMA3 = Family("gemma3_text", _gemma3)
