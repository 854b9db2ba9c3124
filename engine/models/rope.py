"""Rotary position embedding: inverse frequencies and the cos/sin scale of every rope type we serve.

`rope` is a config.json rope dict (transformers 5 `rope_parameters`, or the older `rope_scaling` with the
theta beside it, normalised by the loader): {"rope_type": ..., "rope_theta": ..., type-specific keys}.
The formulas are the published ones (Llama 3, YaRN, LongRoPE); tests compare each with transformers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def partial_rotary_perm(head_dim: int, rotary_dim: int) -> Tensor:
    """Partial rotary (only the first `rotary_dim` dims of a head rotate, pairs (i, i + rotary_dim/2)) as
    full-width rotary: q/k dims reordered so those pairs sit at (j, j + head_dim/2), the dims that do not
    rotate after them in each half, where a frequency of 0 leaves them as they are. q.k is unchanged by
    reordering both, so attention is too, and the fused RoPE kernel needs no partial mode. Returns the
    old dim of each new one ([head_dim] int64)."""
    half, rot, rest = head_dim // 2, rotary_dim // 2, (head_dim - rotary_dim) // 2
    order = [*range(rot), *range(rotary_dim, rotary_dim + rest)]
    order += [*range(rot, rotary_dim), *range(rotary_dim + rest, head_dim)]
    assert len(order) == head_dim and half == rot + rest
    return torch.tensor(order, dtype=torch.int64)


def head_rows_perm(num_heads: int, head_dim: int, rotary_dim: int) -> Tensor:
    """partial_rotary_perm for every head of a [num_heads * head_dim] projection output."""
    one = partial_rotary_perm(head_dim, rotary_dim)
    return torch.cat([one + h * head_dim for h in range(num_heads)])


def rope_type(rope: dict[str, Any]) -> str:
    name = str(rope.get("rope_type", rope.get("type", "default")))
    # Phi-3's older configs call LongRoPE "su" (and some "yarn" with long/short factors).
    if name == "su" or (name == "yarn" and "long_factor" in rope):
        return "longrope"
    return name


def inv_freq_and_scale(head_dim: int, rope: dict[str, Any], max_positions: int) -> tuple[Tensor, float]:
    """([D/2] float32 inverse frequencies, the factor cos and sin are multiplied by)."""
    kind = rope_type(rope)
    theta = float(rope.get("rope_theta", 10000.0))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # [D/2]
    inv_freq = 1.0 / (theta**exponents)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, theta, rope, max_positions)
    if kind == "longrope":
        return _longrope(exponents, theta, rope, max_positions)
    raise ValueError(f"unsupported rope type {kind!r} (supported: {', '.join(ROPE_TYPES)})")


def _llama3(inv_freq: Tensor, rope: dict[str, Any]) -> Tensor:
    # Keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(
    inv_freq: Tensor, dim: int, theta: float, rope: dict[str, Any], max_positions: int
) -> tuple[Tensor, float]:
    """YaRN: interpolate (divide by `factor`) the dimensions that rotate few times over the original
    context, keep those that rotate many times, ramp linearly between; scale attention by mscale."""
    old_len = float(rope["original_max_position_embeddings"])
    factor = float(rope.get("factor") or max_positions / old_len)
    attention = rope.get("attention_factor")
    if attention is None:
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all))
        else:
            attention = _yarn_mscale(factor)
    fast, slow = float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention)


def _longrope(
    exponents: Tensor, theta: float, rope: dict[str, Any], max_positions: int
) -> tuple[Tensor, float]:
    """LongRoPE (Phi-3): per-dimension divisors, `long_factor` when the served context is longer than the
    original one, else `short_factor`. transformers switches per forward on the sequence length, which
    re-rotates every cached key; a KV cache cannot, so the choice here is fixed by the served context."""
    old_len = int(rope.get("original_max_position_embeddings") or max_positions)
    factor = float(rope.get("factor") or max_positions / old_len)
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    divisors = rope["long_factor"] if max_positions > old_len else rope["short_factor"]
    ext = torch.tensor([float(x) for x in divisors], dtype=torch.float32)
    if ext.shape != exponents.shape:
        raise ValueError(f"longrope factors have {ext.numel()} entries; head_dim/2 = {exponents.numel()}")
    return 1.0 / (ext * theta**exponents), float(attention)
