"""Attention over a paged KV cache, with grouped-query heads.

The cache is `[num_blocks, block_size, Hkv, D]`; a sequence's keys live in the blocks its block table
lists, in order. One function serves prefill, chunked prefill, prefix-cache hits and decode: a step's new
tokens of each sequence attend causally to everything before them, cached or new.

Shape vocabulary: T tokens in the step, B sequences, Hq/Hkv query/KV heads, D head dim.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
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
    *,
    window: int = 0,
    softcap: float = 0.0,
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
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(ctx - n_new, ctx, device=q.device)
        causal = pos[None, :] <= q_pos[:, None]  # [n_new, ctx]
        if window:
            causal &= pos[None, :] > q_pos[:, None] - window  # the last `window` positions, own included
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_begin:q_end] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    assert out.shape[2] == head_dim
    return out


# ---------------------------------------------------------------------------------------------------
# Triton kernels.


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_kv_heads, head_dim, block_size, num_slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t)
    # -1 means "no write"; anything past the cache is a caller bug that must not become a stray write.
    if (slot < 0) | (slot >= num_slots):
        return
    block, offset = slot // block_size, slot % block_size
    offs_h, offs_d = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < head_dim)[None, :]
    src = offs_h[:, None] * stride_kh + offs_d[None, :]
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + src, mask=mask)
    tl.store(k_cache_ptr + block * stride_cb + offset * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :],
             k, mask=mask)  # fmt: skip
    src = offs_h[:, None] * stride_vh + offs_d[None, :]
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + src, mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :],
             v, mask=mask)  # fmt: skip


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k_cache[slot // bs, slot % bs] = k[t] (same for v); slot -1 skips the token.

    Slots past the cache are skipped too (a caller bug, but never a write outside the cache).
    k, v [T, Hkv, D] (last dim contiguous; token/head strides free, e.g. views into a fused qkv);
    caches [num_blocks, block_size, Hkv, D] contiguous, k's dtype; slot_mapping [T] int64 (or int32).
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and k.stride(2) == 1 and v.stride(2) == 1
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.dtype == k.dtype == v.dtype == v_cache.dtype
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int64, torch.int32)
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, num_kv_heads, head_dim, k_cache.shape[1],
        k_cache.shape[0] * k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


@triton.jit
def _attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2, num_seqs, head_dim, num_blocks, window, softcap,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):  # fmt: skip
    # WINDOW / SOFTCAP are compile-time switches: off, the code is the plain causal kernel, no extra work.
    # Program (i, kv head, split): the i-th query tile counted as `query_start_loc[b] // BLOCK_T + b`
    # for the tiles of sequence b, an upper bound on tiles before b that needs no host sync.
    pid, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo, hi = num_seqs * 0, num_seqs + 0  # tensors from the start: loop-carried values keep one type
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_T + mid <= pid:
            lo = mid
        else:
            hi = mid
    q_begin = tl.load(query_start_loc_ptr + lo)
    q_len = tl.load(query_start_loc_ptr + lo + 1) - q_begin
    t0 = (pid - (q_begin // BLOCK_T + lo)) * BLOCK_T
    if t0 >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + lo)
    # Rows are (token, query head of this KV head's group) pairs: GQA shares each K/V tile across them.
    rows = tl.arange(0, BLOCK_T * GROUP_PAD)
    tok = t0 + rows // GROUP_PAD
    head = kvh * GROUP + rows % GROUP_PAD
    row_mask = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q = tl.load(
        q_ptr + (q_begin + tok)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )  # fmt: skip
    q_pos = ctx - q_len + tok  # [rows] absolute position: query i attends keys 0..q_pos
    kv_end = ctx - q_len + tl.minimum(t0 + BLOCK_T, q_len)
    kv_begin = kv_end * 0
    if WINDOW:
        # The tile's first query sees keys from q_pos - window + 1 on; nothing before that is read.
        kv_begin = tl.maximum(ctx - q_len + t0 - window + 1, 0)
    # Each split takes an equal share of *this tile's* keys (whole BLOCK_N tiles), not of the longest
    # context the block table could hold: a short sequence in a wide (CUDA-graph) table still spreads
    # over every split instead of leaving them empty while one program walks all its keys.
    keys_per_split = tl.cdiv(tl.cdiv(kv_end - kv_begin, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    kv_lo = kv_begin + split * keys_per_split
    kv_hi = tl.minimum(kv_end, kv_lo + keys_per_split)
    m_i = tl.full((BLOCK_T * GROUP_PAD,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_T * GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T * GROUP_PAD, BLOCK_D), dtype=tl.float32)
    table = block_tables_ptr + lo.to(tl.int64) * stride_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_hi
        page = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        # A block id outside the cache (a caller bug) masks its keys instead of reading foreign memory.
        n_mask = n_mask & (page >= 0) & (page < num_blocks)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_off = page * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks + kvh * stride_kh
        k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [N, D]
        v_off = page * stride_vb + (offs_n % BLOCK_SIZE) * stride_vs + kvh * stride_vh
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [rows, N], log2 units
        if SOFTCAP:
            # cap * tanh(score / cap) in natural units, then back to log2 ones; tanh(x) = 1 - 2/(e^2x + 1).
            s = softcap * 1.4426950408889634 * (1.0 - 2.0 / (tl.exp2(2.0 * s / softcap) + 1.0))
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = (
        out_ptr + split * stride_os + (q_begin + tok)[:, None].to(tl.int64) * stride_ot
        + head[:, None] * stride_oh + offs_d[None, :]
    )  # fmt: skip
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        lse_ptrs = lse_ptr + split * stride_ls + (q_begin + tok).to(tl.int64) * stride_lt + head
        tl.store(lse_ptrs, lse, mask=row_mask)


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits, head_dim,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t, h = tl.program_id(0), tl.program_id(1)
    offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    s_mask, d_mask = offs_s < num_splits, offs_d < head_dim
    lse = tl.load(
        lse_ptr + offs_s * stride_ls + t.to(tl.int64) * stride_lt + h, mask=s_mask, other=float("-inf")
    )
    weight = tl.exp2(lse - tl.max(lse, 0))  # splits that saw no keys have lse -inf: weight 0
    part = tl.load(
        part_ptr + offs_s[:, None] * stride_ps + t.to(tl.int64) * stride_pt + h * stride_ph + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :], other=0.0,
    )  # fmt: skip
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh + offs_d, out, mask=d_mask)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_num_splits(programs: int, max_context: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    # Few programs (small batch) on long contexts leave SMs idle: give each a slice of the context.
    want = triton.cdiv(4 * _num_sms(device.index or 0), max(1, programs))
    return max(1, min(want, triton.cdiv(max_context, 256), 32))


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    *,
    window: int = 0,
    softcap: float = 0.0,
    num_splits: int | None = None,
    block_rows: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> Tensor:
    """out[t, h] = softmax(scale * q[t, h] . K[b, :p+1, h // G]) @ V[b, :p+1, h // G], p = position of t.

    Causal attention of each sequence's new tokens over its whole paged context (cached + new).
    q [T, Hq, D] (last dim contiguous); k_cache, v_cache [num_blocks, block_size, Hkv, D] contiguous, q's
    dtype; block_tables [B, max_blocks] int32; seq_lens [B] int32 = context length *including* the new
    tokens; query_start_loc [B+1] int32, cumulative new-token counts, query_start_loc[B] == T. Sequence b's
    queries are its last (query_start_loc[b+1] - query_start_loc[b]) positions. G = Hq // Hkv (GQA).
    Returns [T, Hq, D] in q's dtype. Block ids outside [0, num_blocks) are read as absent keys (a caller
    bug, but never a read outside the cache). The launch grid depends only on shapes (CUDA-graph safe);
    num_splits (None: picked from shapes) splits long contexts across programs, merged afterwards.
    block_rows (None: 16 for decode batches, 64 otherwise) query rows per tile, GQA group included.
    window > 0: sliding-window attention, query at position p sees keys p - window + 1 .. p only (and
    reads nothing older); softcap > 0: scores become softcap * tanh(score / softcap) (Gemma 2). Both are
    compile-time switches of the kernel, so layers without them run the plain causal code.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
    assert k_cache.dtype == v_cache.dtype == q.dtype
    assert num_q_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert block_tables.dtype == seq_lens.dtype == query_start_loc.dtype == torch.int32
    assert block_tables.stride(1) == 1 and seq_lens.shape == (num_seqs,)
    assert query_start_loc.shape == (num_seqs + 1,)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # Decode batches (about one token per sequence) want few rows per tile, prefill many.
    rows = block_rows or (16 if num_tokens <= num_seqs else 64)
    block_t = max(1, rows // group_pad)
    tiles = num_tokens // block_t + num_seqs
    max_context = block_tables.shape[1] * block_size
    splits = num_splits or _pick_num_splits(tiles * num_kv_heads, max_context, q.device)
    if splits > 1:
        part = torch.empty((splits, num_tokens, num_q_heads, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((splits, num_tokens, num_q_heads), dtype=torch.float32, device=q.device)
    else:
        part, lse = out[None], out  # lse unused without splits
    _attention_kernel[(tiles, num_kv_heads, splits)](
        q, k_cache, v_cache, part, lse, block_tables, seq_lens, query_start_loc,
        scale * math.log2(math.e), num_seqs, head_dim, k_cache.shape[0], window, float(softcap),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0) if splits > 1 else 0, lse.stride(1) if splits > 1 else 0,
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=group_pad, BLOCK_T=block_t, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), SPLIT=splits > 1,  # dots need K >= 16
        WINDOW=window > 0, SOFTCAP=softcap > 0,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            part, lse, out, splits, head_dim,
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(head_dim),
        )  # fmt: skip
    return out
