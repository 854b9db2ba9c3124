"""Plain-torch twins of the multi-LoRA kernels, and the per-step token -> slot grouping they share.

Split from kernels/lora.py only for size; import everything from there (it re-exports these).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LoRAMeta:
    """Token -> slot grouping of one step, in buffers whose sizes depend only on T and S_max.

    Fixed sizes (and no data-dependent launch grids in the kernels) keep a launch capturable in a
    CUDA graph: a replay only needs new contents in the same buffers.
    """

    token_slots: Tensor  # [T] int32, adapter slot per token, -1 = no LoRA
    sorted_token_ids: Tensor  # [T] int32, token indices grouped by slot (slot -1 tokens last)
    seg_slots: Tensor  # [S_max] int32, slot of each segment (-1 for unused segments)
    seg_starts: Tensor  # [S_max] int32, start offset of each segment in sorted_token_ids
    seg_lens: Tensor  # [S_max] int32, tokens in each segment (0 for unused)
    num_segments: int


def make_lora_meta(token_slots: Tensor, max_segments: int) -> LoRAMeta:
    """Group tokens by adapter slot. token_slots [T] int (values -1 or in [0, max_segments)).

    Used segments come first, in increasing slot order. The buffers are built on token_slots' device;
    the range check and `num_segments` read two scalars back (one sync per step, not per layer).
    Slots outside [-1, max_segments) are a caller bug and raise ValueError.
    """
    assert token_slots.dim() == 1, "token_slots must be [T]"
    assert max_segments >= 1
    device = token_slots.device
    slots = token_slots.to(torch.int64)
    num_tokens = slots.shape[0]
    if num_tokens:
        hi, lo = int(slots.max()), int(slots.min())
        if hi >= max_segments or lo < -1:
            raise ValueError(f"token slots must be -1 or in [0, {max_segments}), got [{lo}, {hi}]")
    # Slot -1 sorts last so the used tokens form one prefix; those tokens belong to no segment.
    keys = torch.where(slots < 0, torch.full_like(slots, max_segments), slots)
    sorted_ids = torch.sort(keys, stable=True).indices
    counts = torch.zeros(max_segments + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    counts = counts[:max_segments]
    starts_by_slot = torch.cumsum(counts, 0) - counts
    present = counts > 0
    # Compact: the k-th present slot becomes segment k; absent slots are scattered into a spare row.
    seg_index = torch.where(present, torch.cumsum(present.to(torch.int64), 0) - 1, max_segments)
    slot_ids = torch.arange(max_segments, dtype=torch.int64, device=device)
    seg_slots = torch.full((max_segments + 1,), -1, dtype=torch.int64, device=device)
    seg_starts = torch.zeros(max_segments + 1, dtype=torch.int64, device=device)
    seg_lens = torch.zeros(max_segments + 1, dtype=torch.int64, device=device)
    seg_slots.scatter_(0, seg_index, slot_ids)
    seg_starts.scatter_(0, seg_index, starts_by_slot)
    seg_lens.scatter_(0, seg_index, counts)
    return LoRAMeta(
        token_slots=token_slots.to(torch.int32).contiguous(),
        sorted_token_ids=sorted_ids.to(torch.int32),
        seg_slots=seg_slots[:max_segments].to(torch.int32),
        seg_starts=seg_starts[:max_segments].to(torch.int32),
        seg_lens=seg_lens[:max_segments].to(torch.int32),
        num_segments=int(present.sum()),
    )


def _segments(meta: LoRAMeta) -> list[tuple[int, Tensor]]:
    """(slot, token indices) of each used segment, on the host: for the references only."""
    out = []
    slots, starts, lens = meta.seg_slots.tolist(), meta.seg_starts.tolist(), meta.seg_lens.tolist()
    for i in range(meta.num_segments):
        idx = meta.sorted_token_ids[starts[i] : starts[i] + lens[i]].to(torch.int64)
        out.append((slots[i], idx))
    return out


def _product(a: Tensor, b: Tensor, per_token: bool) -> Tensor:
    """a @ b; per_token: one [1, K] product per row of a, each on a fresh copy of its row, so the BLAS
    sees the same shape and alignment whatever the batch (deterministic mode, kernels/batch_invariant.py)."""
    if not per_token or a.shape[0] == 0:
        return a @ b
    b = b.contiguous()
    return torch.cat([a[i : i + 1].clone() @ b for i in range(a.shape[0])])


def lora_shrink_ref(
    x: Tensor,
    weights_a: list[Tensor],
    meta: LoRAMeta,
    out: Tensor,
    ranks: Tensor | None = None,
    per_token: bool = False,
) -> None:
    """out[n, t, :] = x[t] @ A_n[slot(t)].T (float32); zeros for slot -1 tokens. See lora_shrink."""
    out.zero_()
    for slot, idx in _segments(meta):
        xs = x[idx].float()  # [t, H]
        rank = out.shape[2] if ranks is None else int(ranks[slot])
        for n, a in enumerate(weights_a):
            out[n, idx, :rank] = _product(xs, a[slot, :rank].float().T, per_token)


def lora_expand_ref(
    buf: Tensor,
    weights_b: list[Tensor],
    meta: LoRAMeta,
    y: Tensor,
    scales: Tensor,
    ranks: Tensor | None = None,
    per_token: bool = False,
) -> None:
    """y[t, off_n:off_n+O_n] += scales[slot(t)] * buf[n, t] @ B_n[slot(t)].T. See lora_expand."""
    for slot, idx in _segments(meta):
        rank = buf.shape[2] if ranks is None else int(ranks[slot])
        off = 0
        for n, b in enumerate(weights_b):
            width = b.shape[1]
            delta = _product(buf[n, idx, :rank], b[slot, :, :rank].float().T, per_token)  # [t, O_n]
            cols = slice(off, off + width)
            y[idx, cols] = (y[idx, cols].float() + float(scales[slot]) * delta).to(y.dtype)
            off += width
