"""Attention over a paged KV cache, with grouped-query heads.

The cache is `[num_blocks, block_size, Hkv, D]`; a sequence's keys live in the blocks its block table
lists, in order. One function serves prefill, chunked prefill, prefix-cache hits and decode: a step's new
tokens of each sequence attend causally to everything before them, cached or new.

Shape vocabulary: T tokens in the step, B sequences, Hq/Hkv query/KV heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor


def write_kv_ref(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k_cache[slot // bs, slot % bs] = k[t] (same for v); slot -1 skips the token. See write_kv."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(torch.int64)
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def paged_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
) -> Tensor:
    """Causal attention of each sequence's new tokens over its paged context. See paged_attention."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for b, ctx in enumerate(seq_lens.tolist()):
        q_begin, q_end = starts[b], starts[b + 1]
        n_new = q_end - q_begin
        if n_new == 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        blocks = block_tables[b].to(torch.int64)[pos // block_size]
        keys = k_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        values = v_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)
        qs = q[q_begin:q_end].float()  # [n_new, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale  # [Hq, n_new, ctx]
        q_pos = torch.arange(ctx - n_new, ctx, device=q.device)
        causal = pos[None, :] <= q_pos[:, None]  # [n_new, ctx]
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_begin:q_end] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    assert out.shape[2] == head_dim
    return out
