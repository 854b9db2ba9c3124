"""Batched multi-LoRA in the style of Punica's SGMV: many adapters in one launch.

A LoRA layer adds `scale * (x @ A.T) @ B.T` to a base projection. In one step every token may use a
different adapter slot, so tokens are grouped by slot once per step (`make_lora_meta`) and every layer's
shrink (x -> x @ A.T) and expand (-> y += scale * buf @ B.T) walks those groups ("segments").

Shape vocabulary: T tokens, H hidden, R (max) rank, S adapter slots, N slices fused in one launch
(q/k/v or gate/up), O_n output width of slice n.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# The step metadata and the references live in lora_ref.py (size); this module is the one to import.
from kernels.lora_ref import LoRAMeta, lora_expand_ref, lora_shrink_ref, make_lora_meta

__all__ = [
    "LoRALaunch",
    "LoRAMeta",
    "lora_expand",
    "lora_expand_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "make_lora_meta",
]


# ---------------------------------------------------------------------------------------------------
# Triton kernels. Grid: (lane, segment, slice [x split]); each lane loops over its share of the segment's
# token blocks. The grid depends only on T, S_max, the weight shapes and the launch choices, never on the
# slot mix (CUDA-graph safe); programs of unused segments return at once, and slot -1 tokens are in no
# segment, so they cost nothing.

MAX_SLICES_PER_LAUNCH = 3  # q/k/v; more slices are launched in groups of three


@triton.jit
def _pick(n, p0, p1, p2):
    p = p0
    if n == 1:
        p = p1
    if n == 2:
        p = p2
    return p


# split_k is a plain argument, never specialized: it follows the number of adapters in a step (1-8), and
# as a constexpr each new value compiled a kernel variant in the middle of a serving step (H200,
# 2026-12-03: 16 compiles, 5.6 s, in workload e's cold run; the slowest steps 0.7-1.1 s).
@triton.jit(do_not_specialize=["split_k"])
def _shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, out_ptr,
    sorted_ids_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, ranks_ptr,
    hidden, max_rank, k_per_split, num_tokens, max_segments, split_k,
    stride_xt, stride_xh, stride_as, stride_ar, stride_ah, stride_on, stride_ot, stride_or,
    HAS_RANKS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # Program (lane, segment, slice x split): lane j takes the segment's token blocks j, j + lanes, ...
    lane, seg, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lanes = tl.num_programs(0)
    n, split = pid_z // split_k, pid_z % split_k
    offs_r = tl.arange(0, BLOCK_R)
    if seg == max_segments:
        # One extra segment index writes the zero rows of slot -1 tokens (sorted after all others), so
        # an unsplit launch needs no memset. Split launches get a zeroed `out` from the wrapper instead.
        if split_k == 1:
            offs_s = tl.arange(0, BLOCK_S)
            used = tl.sum(tl.load(seg_lens_ptr + offs_s, mask=offs_s < max_segments, other=0))
            for m0 in range(used + lane * BLOCK_M, num_tokens, lanes * BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                tok = tl.load(sorted_ids_ptr + offs_m, mask=offs_m < num_tokens, other=0)
                zero_ptrs = (
                    out_ptr
                    + n * stride_on
                    + tok[:, None].to(tl.int64) * stride_ot
                    + offs_r[None, :] * stride_or
                )
                tl.store(zero_ptrs, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                         mask=(offs_m < num_tokens)[:, None] & (offs_r < max_rank)[None, :])  # fmt: skip
        return
    # Independent loads first, so their latencies overlap before the exit test.
    seg_len = tl.load(seg_lens_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg)
    seg_start = tl.load(seg_starts_ptr + seg)
    if lane * BLOCK_M >= seg_len:
        return
    rank = max_rank
    if HAS_RANKS:
        # Clamped: a rank past R would read the next slot's rows (or past the tensor's end).
        rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    a_ptr = _pick(n, a0_ptr, a1_ptr, a2_ptr)
    r_mask = offs_r < rank  # rows past this slot's rank are never read: they only cost a mask
    a_base = a_ptr + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, hidden)
    for m0 in range(lane * BLOCK_M, seg_len, lanes * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seg_len
        tok = tl.load(sorted_ids_ptr + seg_start + offs_m, mask=m_mask, other=0)
        x_base = x_ptr + tok[:, None].to(tl.int64) * stride_xt
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(k_begin, k_end, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            xt = tl.load(
                x_base + offs_k[None, :] * stride_xh, mask=m_mask[:, None] & k_mask[None, :], other=0.0
            )
            at = tl.load(
                a_base + offs_k[:, None] * stride_ah, mask=r_mask[None, :] & k_mask[:, None], other=0.0
            )
            acc += tl.dot(xt, at, input_precision=PRECISION)  # [BLOCK_M, BLOCK_R]
        out_ptrs = (
            out_ptr + n * stride_on + tok[:, None].to(tl.int64) * stride_ot + offs_r[None, :] * stride_or
        )
        out_mask = m_mask[:, None] & (offs_r < max_rank)[None, :]
        if split_k == 1:
            tl.store(out_ptrs, acc, mask=out_mask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)


@triton.jit
def _expand_kernel(
    buf_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr,
    sorted_ids_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, ranks_ptr, scales_ptr,
    width0, width1, width2, col0, col1, col2, stride_bs0, stride_bs1, stride_bs2,
    max_rank, groups_per_slice, tiles_per_program,
    stride_fn, stride_ft, stride_fr, stride_bo, stride_br, stride_yt, stride_yo,
    HAS_RANKS: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Program (lane, segment, slice x column group): a group is `tiles_per_program` column tiles, walked
    # in a loop so that one program keeps several B tiles in flight.
    lane, seg, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lanes = tl.num_programs(0)
    seg_len = tl.load(seg_lens_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg)
    seg_start = tl.load(seg_starts_ptr + seg)
    if lane * BLOCK_M >= seg_len:
        return
    n, group = pid_z // groups_per_slice, pid_z % groups_per_slice
    width = _pick(n, width0, width1, width2)
    first_tile = group * tiles_per_program
    if first_tile * BLOCK_N >= width:
        return
    rank = max_rank
    if HAS_RANKS:
        # Clamped: a rank past R would read the next slot's rows (or past the tensor's end).
        rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    b_ptr = _pick(n, b0_ptr, b1_ptr, b2_ptr)
    stride_bs = _pick(n, stride_bs0, stride_bs1, stride_bs2)
    col = _pick(n, col0, col1, col2)
    load_rank = rank
    if ALIGNED:
        # Widths, offsets and R are multiples of 8 (wrapper-checked): telling the compiler lets B rows and
        # y columns move in 16-byte vectors. Rows up to the next multiple of 8 are read, then zeroed.
        col, width = tl.multiple_of(col, 8), tl.multiple_of(width, 8)
        stride_bs, stride_bo = tl.multiple_of(stride_bs, 8), tl.multiple_of(stride_bo, 8)
        load_rank = tl.multiple_of(tl.minimum((rank + 7) // 8 * 8, max_rank), 8)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    b_base = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br
    last_tile = tl.minimum(first_tile + tiles_per_program, (width + BLOCK_N - 1) // BLOCK_N)
    scale = tl.load(scales_ptr + slot)
    for m0 in range(lane * BLOCK_M, seg_len, lanes * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seg_len
        tok = tl.load(sorted_ids_ptr + seg_start + offs_m, mask=m_mask, other=0)
        h = tl.load(
            buf_ptr + n * stride_fn + tok[:, None].to(tl.int64) * stride_ft + offs_r[None, :] * stride_fr,
            mask=m_mask[:, None] & (offs_r < load_rank)[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_R] float32
        h = tl.where(r_mask[None, :], h, 0.0)
        y_rows = y_ptr + tok[:, None].to(tl.int64) * stride_yt
        for tile in range(first_tile, last_tile):
            offs_o = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            o_mask = offs_o < width
            bt = tl.load(
                b_base + offs_o[None, :] * stride_bo,
                mask=(offs_r < load_rank)[:, None] & o_mask[None, :],
                other=0.0,
            )  # [BLOCK_R, BLOCK_N]
            bt = tl.where(
                r_mask[:, None], bt, 0.0
            )  # NaN/inf padding past the rank must not leak in as 0 * NaN
            delta = tl.dot(h.to(bt.dtype), bt, input_precision=PRECISION) * scale
            y_ptrs = y_rows + (col + offs_o)[None, :] * stride_yo
            y_mask = m_mask[:, None] & o_mask[None, :]
            y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
            tl.store(y_ptrs, (y_old.to(tl.float32) + delta).to(y_old.dtype), mask=y_mask)


@dataclass(frozen=True)
class LoRALaunch:
    """Block shapes of one launch; None picks them from the shapes. Exposed for tests and tuning."""

    block_m: int | None = None  # tokens per block (1 is fine: the product pads it for the tensor cores)
    lanes: int | None = None  # programs sharing one segment's token blocks (each loops over its share)
    block_k: int | None = None  # shrink: hidden columns per step
    block_n: int | None = None  # expand: output columns per tile (256 for decode at R <= 16, else 128)
    split_k: int | None = None  # shrink: programs sharing one token block's hidden dimension
    num_warps: int = 4
    num_stages: int | None = None  # None: shrink 2-4 by shared memory; expand 2 (its column-tile loop)
    tiles_per_program: int | None = None  # expand: column tiles one program walks (None: by token block)


def _block_r(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))  # expand's product runs over R: its K must be >= 16


def _token_blocks(num_tokens: int, meta: LoRAMeta, cfg: LoRALaunch) -> tuple[int, int]:
    """(block_m, lanes). Sized for the average segment; a longer one loops, a shorter one masks."""
    per_segment = triton.cdiv(num_tokens, max(1, meta.num_segments))
    block_m = cfg.block_m or (
        4 if per_segment <= 2 else min(64, max(16, triton.next_power_of_2(per_segment)))
    )
    lanes = cfg.lanes or min(triton.cdiv(num_tokens, block_m), triton.cdiv(per_segment, block_m))
    return block_m, max(1, lanes)


def _shrink_launch(
    cfg: LoRALaunch, x: Tensor, meta: LoRAMeta, block_m: int, block_r: int, lanes: int, num_slices: int
) -> tuple[int, int, int]:
    """(block_k, split_k, num_stages), from the sweeps in benchmarks/archive/2026-11-27-kernels.md (runs 2-4)."""
    # Long steps over K keep more bytes in flight per program; big token or rank tiles take smaller ones.
    block_k = cfg.block_k or (128 if block_m >= 32 or block_r > 64 else 512 if block_r <= 16 else 256)
    split_k = cfg.split_k
    if split_k is None:
        # Fewer programs than SMs (few adapters and tokens) leave HBM idle: split the hidden dimension
        # across programs (atomic adds after a memset). Otherwise unsplit was fastest, and deterministic.
        # float32 is never split: its sums stay in one order.
        programs = max(1, min(meta.num_segments, meta.seg_slots.shape[0]) * lanes * num_slices)
        sms = _num_sms(x.device)
        split_k = 1 if x.dtype == torch.float32 or programs >= sms else min(8, triton.cdiv(2 * sms, programs))
    split_k = max(1, min(split_k, triton.cdiv(x.shape[1], block_k)))
    stages = cfg.num_stages
    if stages is None:
        per_stage = (block_m * block_k + block_k * block_r) * x.element_size()
        stages = max(1, min(3 if block_m >= 32 else 4, (110 * 1024) // per_stage))
    return block_k, split_k, stages


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any number gives the same results
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    # float32 weights get exact float32 products (the engine's fp32 path must match PEFT token for token).
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_meta(meta: LoRAMeta, num_tokens: int, num_slots: int, device: torch.device) -> None:
    assert meta.sorted_token_ids.shape == (num_tokens,), "meta was built for another number of tokens"
    # make_lora_meta keeps slots below max_segments; this keeps them below the weights' slot count.
    assert meta.seg_slots.shape[0] <= num_slots, "meta allows more slots than the weights have"
    for t in (meta.sorted_token_ids, meta.seg_slots, meta.seg_starts, meta.seg_lens):
        assert t.dtype == torch.int32 and t.is_contiguous() and t.device == device


def _check_ranks(ranks: Tensor | None, num_slots: int, device: torch.device) -> None:
    if ranks is not None:
        assert ranks.shape == (num_slots,) and ranks.dtype == torch.int32 and ranks.device == device


def lora_shrink(
    x: Tensor,
    weights_a: list[Tensor],
    meta: LoRAMeta,
    out: Tensor,
    ranks: Tensor | None = None,
    *,
    launch: LoRALaunch | None = None,
) -> None:
    """out[n, t, :] = x[t] @ A_n[slot(t)].T for every slice n; tokens with slot -1 get zeros.

    x [T, H] (fp16/bf16/fp32, last dim contiguous); weights_a: N tensors [S, R, H], contiguous, x's dtype;
    meta from make_lora_meta over these T tokens; out [N, T, R] float32 contiguous (overwritten);
    ranks [S] int32 or None: rows >= ranks[slot] of A are not read and come out as zeros.
    """
    cfg = launch or LoRALaunch()
    num_tokens, hidden = x.shape
    num_slices, num_slots, max_rank = len(weights_a), weights_a[0].shape[0], weights_a[0].shape[1]
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [T, H] with contiguous rows"
    for a in weights_a:
        assert a.shape == (num_slots, max_rank, hidden) and a.dtype == x.dtype and a.is_contiguous()
    assert out.shape == (num_slices, num_tokens, max_rank) and out.dtype == torch.float32
    assert out.is_contiguous()
    _check_meta(meta, num_tokens, num_slots, x.device)
    _check_ranks(ranks, num_slots, x.device)
    if num_tokens == 0:
        return
    (block_m, lanes), block_r = _token_blocks(num_tokens, meta, cfg), _block_r(max_rank)
    block_k, split_k, stages = _shrink_launch(cfg, x, meta, block_m, block_r, lanes, num_slices)
    k_per_split = triton.cdiv(triton.cdiv(hidden, split_k), block_k) * block_k
    if split_k > 1:
        out.zero_()  # atomic adds need a zero start; unsplit launches write every row themselves
    max_segments = meta.seg_slots.shape[0]
    for first in range(0, num_slices, MAX_SLICES_PER_LAUNCH):
        group = weights_a[first : first + MAX_SLICES_PER_LAUNCH]
        a0, a1, a2 = (group + [group[0]] * 2)[:3]
        part = out[first : first + len(group)]
        grid = (lanes, max_segments + 1, len(group) * split_k)
        _shrink_kernel[grid](
            x, a0, a1, a2, part,
            meta.sorted_token_ids, meta.seg_slots, meta.seg_starts, meta.seg_lens,
            ranks if ranks is not None else meta.seg_lens,
            hidden, max_rank, k_per_split, num_tokens, max_segments, split_k,
            x.stride(0), x.stride(1), a0.stride(0), a0.stride(1), a0.stride(2),
            part.stride(0), part.stride(1), part.stride(2),
            HAS_RANKS=ranks is not None, PRECISION=_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
            BLOCK_S=triton.next_power_of_2(max_segments), num_warps=cfg.num_warps, num_stages=stages,
        )  # fmt: skip


def lora_expand(
    buf: Tensor,
    weights_b: list[Tensor],
    meta: LoRAMeta,
    y: Tensor,
    scales: Tensor,
    ranks: Tensor | None = None,
    *,
    launch: LoRALaunch | None = None,
) -> None:
    """y[t, off_n:off_n+O_n] += scales[slot(t)] * buf[n, t] @ B_n[slot(t)].T; y unchanged for slot -1.

    buf [N, T, R] float32 (from lora_shrink); weights_b: N tensors [S, O_n, R], contiguous, y's dtype;
    y [T, sum O_n] (in place, last dim contiguous); scales [S] float32; ranks [S] int32 or None
    (None = R for every slot). Sums in float32, rounds once into y.
    """
    cfg = launch or LoRALaunch()
    num_slices, num_tokens, max_rank = buf.shape
    num_slots = weights_b[0].shape[0]
    assert len(weights_b) == num_slices and buf.dtype == torch.float32 and buf.is_contiguous()
    widths = [b.shape[1] for b in weights_b]
    for b in weights_b:
        assert b.shape == (num_slots, b.shape[1], max_rank) and b.dtype == y.dtype and b.is_contiguous()
    assert y.dim() == 2 and y.shape == (num_tokens, sum(widths)) and y.stride(1) == 1
    assert scales.shape == (num_slots,) and scales.dtype == torch.float32 and scales.device == y.device
    _check_meta(meta, num_tokens, num_slots, y.device)
    _check_ranks(ranks, num_slots, y.device)
    if num_tokens == 0:
        return
    (block_m, lanes), block_r = _token_blocks(num_tokens, meta, cfg), _block_r(max_rank)
    # From the run-3 sweep (benchmarks/archive/2026-11-27-kernels.md): 256-column tiles only for small token blocks and
    # ranks (a 64 x 256 float32 tile spills); two tiles per program for decode, four for prefill.
    block_n = cfg.block_n or (256 if block_m <= 16 and block_r <= 16 else 128)
    tiles_per_program = cfg.tiles_per_program or (2 if block_m <= 16 else 4)
    offsets = [sum(widths[:i]) for i in range(num_slices)]
    aligned = all(
        v % 8 == 0 for v in [*widths, *offsets, max_rank, y.stride(0), y.data_ptr() // y.element_size()]
    )
    for first in range(0, num_slices, MAX_SLICES_PER_LAUNCH):
        group = list(range(first, min(first + MAX_SLICES_PER_LAUNCH, num_slices)))
        bs = [weights_b[i] for i in group]
        w = [widths[i] for i in group]
        c = [offsets[i] for i in group]
        pad = 3 - len(group)
        bs, w, c = bs + [bs[0]] * pad, w + [0] * pad, c + [0] * pad
        tiles = triton.cdiv(max(w), block_n)
        groups = triton.cdiv(tiles, tiles_per_program)
        part = buf[first : first + len(group)]
        grid = (lanes, meta.seg_slots.shape[0], len(group) * groups)
        _expand_kernel[grid](
            part, bs[0], bs[1], bs[2], y,
            meta.sorted_token_ids, meta.seg_slots, meta.seg_starts, meta.seg_lens,
            ranks if ranks is not None else meta.seg_lens, scales,
            w[0], w[1], w[2], c[0], c[1], c[2], bs[0].stride(0), bs[1].stride(0), bs[2].stride(0),
            max_rank, groups, tiles_per_program,
            part.stride(0), part.stride(1), part.stride(2), bs[0].stride(1), bs[0].stride(2),
            y.stride(0), y.stride(1),
            HAS_RANKS=ranks is not None, ALIGNED=aligned, PRECISION=_precision(y.dtype),
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n,
            num_warps=cfg.num_warps, num_stages=2 if cfg.num_stages is None else cfg.num_stages,
        )  # fmt: skip
