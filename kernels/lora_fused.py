"""Multi-LoRA shrink and expand in one launch, for decode-sized steps (few tokens per adapter).

The two-launch path (kernels/lora.py) pays two fixed latencies per module group and a rank buffer round
trip; on a decode step they cost ~3x what its bytes need (benchmarks/NOTES.md). Here each program owns
(segment, slice, group of column tiles): it computes its segment's tokens' x @ A.T itself (the same A rows
for every column group of the slice, so all but the first read hit L2), then adds scale * h @ B.T into its
columns of y. Recomputing the shrink per column group is what makes one launch possible; it is cheap while
a segment holds few tokens, and `use_fused` keeps larger steps on the two-launch path.

Same math as lora_shrink + lora_expand: float32 accumulation, h rounded once to the weights' dtype before
the second product, y updated in float32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.lora import (
    MAX_SLICES_PER_LAUNCH,
    LoRALaunch,
    LoRAMeta,
    _block_r,
    _check_meta,
    _check_ranks,
    _num_sms,
    _pick,
    _precision,
    lora_expand_ref,
    lora_shrink_ref,
)

FUSED_MAX_TOKENS = 256  # steps up to this many tokens may use the fused launch
FUSED_MAX_PER_SEGMENT = 16  # ... when their average segment fits one token block


def use_fused(num_tokens: int, num_segments: int) -> bool:
    """Whether a step of this shape should take the one-launch path (decode-like: few tokens an adapter)."""
    per_segment = triton.cdiv(num_tokens, max(1, num_segments))
    return 0 < num_tokens <= FUSED_MAX_TOKENS and per_segment <= FUSED_MAX_PER_SEGMENT


@triton.jit
def _fused_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr,
    sorted_ids_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, ranks_ptr, scales_ptr,
    hidden, width0, width1, width2, col0, col1, col2, stride_bs0, stride_bs1, stride_bs2,
    max_rank, groups_per_slice, tiles_per_program,
    stride_xt, stride_xh, stride_as, stride_ar, stride_ah, stride_bo, stride_br, stride_yt, stride_yo,
    HAS_RANKS: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seg, pid_z = tl.program_id(0), tl.program_id(1)
    # Independent loads first, so their latencies overlap before the exit tests.
    seg_len = tl.load(seg_lens_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg)
    seg_start = tl.load(seg_starts_ptr + seg)
    if seg_len == 0:
        return  # an unused segment (its slot is -1)
    n, group = pid_z // groups_per_slice, pid_z % groups_per_slice
    width = _pick(n, width0, width1, width2)
    first_tile = group * tiles_per_program
    if first_tile * BLOCK_N >= width:
        return
    rank = max_rank
    if HAS_RANKS:
        # Clamped: a rank past R would read the next slot's rows (or past the tensor's end).
        rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    a_ptr = _pick(n, a0_ptr, a1_ptr, a2_ptr)
    b_ptr = _pick(n, b0_ptr, b1_ptr, b2_ptr)
    stride_bs = _pick(n, stride_bs0, stride_bs1, stride_bs2)
    col = _pick(n, col0, col1, col2)
    load_rank = rank
    if ALIGNED:
        # As in the expand kernel: 16-byte B rows and y columns; rows up to a multiple of 8 are read.
        col, width = tl.multiple_of(col, 8), tl.multiple_of(width, 8)
        stride_bs, stride_bo = tl.multiple_of(stride_bs, 8), tl.multiple_of(stride_bo, 8)
        load_rank = tl.multiple_of(tl.minimum((rank + 7) // 8 * 8, max_rank), 8)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank  # rows past this slot's rank are never read
    a_base = a_ptr + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar
    b_base = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br
    last_tile = tl.minimum(first_tile + tiles_per_program, (width + BLOCK_N - 1) // BLOCK_N)
    scale = tl.load(scales_ptr + slot)
    for m0 in range(0, seg_len, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seg_len
        tok = tl.load(sorted_ids_ptr + seg_start + offs_m, mask=m_mask, other=0)
        x_base = x_ptr + tok[:, None].to(tl.int64) * stride_xt
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(0, hidden, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_mask = offs_k < hidden
            xt = tl.load(
                x_base + offs_k[None, :] * stride_xh, mask=m_mask[:, None] & k_mask[None, :], other=0.0
            )
            at = tl.load(
                a_base + offs_k[:, None] * stride_ah, mask=r_mask[None, :] & k_mask[:, None], other=0.0
            )
            acc += tl.dot(xt, at, input_precision=PRECISION)  # [BLOCK_M, BLOCK_R]
        y_rows = y_ptr + tok[:, None].to(tl.int64) * stride_yt
        for tile in range(first_tile, last_tile):
            offs_o = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            o_mask = offs_o < width
            bt = tl.load(
                b_base + offs_o[None, :] * stride_bo,
                mask=(offs_r < load_rank)[:, None] & o_mask[None, :],
                other=0.0,
            )  # [BLOCK_R, BLOCK_N]
            bt = tl.where(r_mask[:, None], bt, 0.0)  # NaN/inf padding past the rank must not leak in
            delta = tl.dot(acc.to(bt.dtype), bt, input_precision=PRECISION) * scale
            y_ptrs = y_rows + (col + offs_o)[None, :] * stride_yo
            y_mask = m_mask[:, None] & o_mask[None, :]
            y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
            tl.store(y_ptrs, (y_old.to(tl.float32) + delta).to(y_old.dtype), mask=y_mask)


def _tiles_per_program(cfg: LoRALaunch, widths: list[int], block_n: int, meta: LoRAMeta, sms: int) -> int:
    """Enough programs to fill the GPU about twice over, each walking as many column tiles as that
    allows (every extra program of a slice reads the slice's A once more, from L2)."""
    if cfg.tiles_per_program:
        return cfg.tiles_per_program
    tiles = sum(triton.cdiv(w, block_n) for w in widths)
    per_segment = triton.cdiv(2 * sms, max(1, meta.num_segments))
    return max(1, triton.cdiv(tiles, per_segment))


def lora_fused(
    x: Tensor,
    weights_a: list[Tensor],
    weights_b: list[Tensor],
    meta: LoRAMeta,
    y: Tensor,
    scales: Tensor,
    ranks: Tensor | None = None,
    *,
    launch: LoRALaunch | None = None,
) -> None:
    """y[t, off_n:off_n+O_n] += scales[slot(t)] * (x[t] @ A_n[slot(t)].T) @ B_n[slot(t)].T, one launch
    per three slices; y unchanged for slot -1 tokens.

    x [T, H]; weights_a N tensors [S, R, H] (x's dtype); weights_b N tensors [S, O_n, R] (y's dtype), all
    contiguous; y [T, sum O_n] in place; scales [S] float32; ranks [S] int32 or None (None = R).
    """
    cfg = launch or LoRALaunch()
    num_tokens, hidden = x.shape
    num_slots, max_rank = weights_a[0].shape[0], weights_a[0].shape[1]
    assert x.dim() == 2 and x.stride(1) == 1 and len(weights_b) == len(weights_a)
    for a in weights_a:
        assert a.shape == (num_slots, max_rank, hidden) and a.dtype == x.dtype and a.is_contiguous()
    widths = [b.shape[1] for b in weights_b]
    for b in weights_b:
        assert b.shape == (num_slots, b.shape[1], max_rank) and b.dtype == y.dtype and b.is_contiguous()
    assert y.dim() == 2 and y.shape == (num_tokens, sum(widths)) and y.stride(1) == 1
    assert scales.shape == (num_slots,) and scales.dtype == torch.float32 and scales.device == y.device
    _check_meta(meta, num_tokens, num_slots, x.device)
    _check_ranks(ranks, num_slots, x.device)
    if num_tokens == 0:
        return
    block_r = _block_r(max_rank)
    block_m = cfg.block_m or 16  # the products' smallest M; decode segments hold a token or a few
    block_k = cfg.block_k or (256 if block_r <= 16 else 128)
    block_n = cfg.block_n or (256 if block_r <= 16 else 128)
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    aligned = all(
        v % 8 == 0 for v in [*widths, *offsets, max_rank, y.stride(0), y.data_ptr() // y.element_size()]
    )
    for first in range(0, len(widths), MAX_SLICES_PER_LAUNCH):
        group = list(range(first, min(first + MAX_SLICES_PER_LAUNCH, len(widths))))
        pad = MAX_SLICES_PER_LAUNCH - len(group)
        a_s = [weights_a[i] for i in group] + [weights_a[group[0]]] * pad
        b_s = [weights_b[i] for i in group] + [weights_b[group[0]]] * pad
        w = [widths[i] for i in group] + [0] * pad
        c = [offsets[i] for i in group] + [0] * pad
        tiles = _tiles_per_program(cfg, w, block_n, meta, _num_sms(x.device))
        groups = triton.cdiv(triton.cdiv(max(w), block_n), tiles)
        grid = (meta.seg_slots.shape[0], len(group) * groups)
        _fused_kernel[grid](
            x, a_s[0], a_s[1], a_s[2], b_s[0], b_s[1], b_s[2], y,
            meta.sorted_token_ids, meta.seg_slots, meta.seg_starts, meta.seg_lens,
            ranks if ranks is not None else meta.seg_lens, scales,
            hidden, w[0], w[1], w[2], c[0], c[1], c[2],
            b_s[0].stride(0), b_s[1].stride(0), b_s[2].stride(0),
            max_rank, groups, tiles,
            x.stride(0), x.stride(1), a_s[0].stride(0), a_s[0].stride(1), a_s[0].stride(2),
            b_s[0].stride(1), b_s[0].stride(2), y.stride(0), y.stride(1),
            HAS_RANKS=ranks is not None, ALIGNED=aligned, PRECISION=_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_N=block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages or 3,
        )  # fmt: skip


def lora_fused_ref(
    x: Tensor,
    weights_a: list[Tensor],
    weights_b: list[Tensor],
    meta: LoRAMeta,
    y: Tensor,
    scales: Tensor,
    ranks: Tensor | None = None,
) -> None:
    """lora_fused in plain torch: the references' shrink into a float32 buffer, then their expand."""
    buf = torch.empty(len(weights_a), x.shape[0], weights_a[0].shape[1], dtype=torch.float32, device=x.device)
    lora_shrink_ref(x, weights_a, meta, buf, ranks)
    lora_expand_ref(buf, weights_b, meta, y, scales, ranks)
