"""Triton multi-LoRA shrink/expand against the references, on fresh random inputs.

On CPU these run in Triton's interpreter (fp32/fp16, tiny shapes); on a GPU the same cases run compiled,
plus bf16 at Llama-3-8B sizes.
"""

from __future__ import annotations

import pytest
import torch

from kernels.lora import (
    LoRALaunch,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
    make_lora_meta,
)

# max relative error ||out - ref|| / ||ref||; fp16/bf16 round the float32 rank buffer once in expand.
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def make_slots(mix: str, num_tokens: int, num_slots: int) -> torch.Tensor:
    if mix == "distinct":
        slots = torch.randperm(num_tokens) % num_slots
    elif mix == "identical":
        slots = torch.full((num_tokens,), num_slots - 1)
    elif mix == "skewed":
        heavy = min(1, num_slots - 1)
        slots = torch.where(torch.rand(num_tokens) < 0.8, heavy, torch.randint(0, num_slots, (num_tokens,)))
    elif mix == "none":
        slots = torch.full((num_tokens,), -1)
    elif mix == "with_minus_one":
        slots = torch.randint(-1, num_slots, (num_tokens,))
    else:
        raise AssertionError(mix)
    return slots.to(torch.int32)


def run_both(
    slots, hidden, widths, max_rank, num_slots, max_segments, dtype, device, ranks=None, launch=None
):
    num_slots = max(num_slots, max_segments)  # weights hold every slot a segment may name
    num_tokens = slots.shape[0]
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    a_list = [
        torch.randn(num_slots, max_rank, hidden, dtype=dtype, device=device) / hidden**0.5 for _ in widths
    ]
    b_list = [torch.randn(num_slots, w, max_rank, dtype=dtype, device=device) for w in widths]
    scales = torch.rand(num_slots, device=device) + 0.5
    meta = make_lora_meta(slots.to(device), max_segments)
    out = torch.full((len(widths), num_tokens, max_rank), float("nan"), device=device)
    want_out = torch.empty_like(out)
    lora_shrink(x, a_list, meta, out, ranks, launch=launch)
    lora_shrink_ref(x, a_list, meta, want_out, ranks)
    y0 = torch.randn(num_tokens, sum(widths), dtype=dtype, device=device)
    y, want_y = y0.clone(), y0.clone()
    lora_expand(want_out, b_list, meta, y, scales, ranks, launch=launch)
    lora_expand_ref(want_out, b_list, meta, want_y, scales, ranks)
    return out, want_out, y, want_y, y0


MIXES = ["distinct", "identical", "skewed", "with_minus_one"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("num_tokens", [1, 19])
def test_shrink_expand_match_reference(mix, num_tokens, dtype, device):
    slots = make_slots(mix, num_tokens, num_slots=4)
    out, want_out, y, want_y, y0 = run_both(
        slots, hidden=40, widths=[24, 8, 8], max_rank=8, num_slots=4, max_segments=6, dtype=dtype,
        device=device, launch=LoRALaunch(block_k=16),
    )  # fmt: skip
    assert rel_err(out, want_out) < REL_TOL[dtype]
    assert rel_err(y - y0, want_y - y0) < REL_TOL[dtype]
    untouched = (slots == -1).to(device)
    assert torch.equal(y[untouched], y0[untouched]), "slot -1 rows must stay bit-identical"
    assert torch.all(out[:, untouched] == 0)


@pytest.mark.parametrize(
    "block_m,lanes,tiles", [(1, 1, 1), (1, 3, 3), (4, 1, 2), (8, 2, 1), (16, 3, 4)], ids=lambda v: str(v)
)
def test_token_blocks_lanes_and_column_tiles_cover_everything(block_m, lanes, tiles, device):
    # A long segment looped over by few lanes, next to one-token segments and slot -1 tokens; widths
    # of 16 and 40 columns in tiles of 16, walked `tiles` at a time (40 leaves a partial tile).
    slots = torch.tensor([2] * 23 + [0, 1, -1, 1, -1], dtype=torch.int32)[torch.randperm(28)]
    launch = LoRALaunch(
        block_m=block_m, lanes=lanes, block_k=16, split_k=2, block_n=16, tiles_per_program=tiles
    )
    out, want_out, y, want_y, y0 = run_both(
        slots, 48, [16, 40], 16, 3, 4, torch.float32, device, launch=launch
    )
    assert rel_err(out, want_out) < REL_TOL[torch.float32]
    assert rel_err(y - y0, want_y - y0) < REL_TOL[torch.float32]


def test_no_lora_tokens_leave_everything_untouched(device):
    slots = make_slots("none", 7, num_slots=3)
    out, _, y, _, y0 = run_both(slots, 32, [16], 16, 3, 3, torch.float32, device)
    assert torch.all(out == 0) and torch.equal(y, y0)


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_sums_to_the_same_result(split_k, device):
    slots = make_slots("with_minus_one", 21, num_slots=3)
    out, want_out, *_ = run_both(
        slots, 70, [16, 16], 8, 3, 3, torch.float32, device, launch=LoRALaunch(block_k=16, split_k=split_k)
    )
    assert rel_err(out, want_out) < REL_TOL[torch.float32]


@pytest.mark.parametrize("widths,max_rank", [([8, 16], 8), ([12, 6], 6)], ids=["aligned", "unaligned"])
def test_mixed_ranks_mask_rows_past_each_slots_rank(widths, max_rank, device):
    slots = make_slots("distinct", 17, num_slots=4)
    ranks = torch.tensor([max_rank, 2, 0, 5], dtype=torch.int32, device=device)
    out, want_out, y, want_y, y0 = run_both(
        slots, 24, widths, max_rank, 4, 4, torch.float32, device, ranks=ranks, launch=LoRALaunch(block_k=16)
    )
    assert rel_err(out, want_out) < REL_TOL[torch.float32]
    assert rel_err(y - y0, want_y - y0) < REL_TOL[torch.float32]
    for slot, rank in enumerate(ranks.tolist()):
        rows = (slots == slot).to(device)
        assert torch.all(out[:, rows, rank:] == 0), "rows past a slot's rank must be zero"
    rank0 = (slots == 2).to(device)
    assert torch.equal(y[rank0], y0[rank0])


def test_ranks_past_r_are_clamped_to_r(device):
    # A bad rank (past R) must not read the next slot's or token's rows: it behaves as rank R (which is
    # what the reference's slicing does). R = 6 takes the unaligned path, where nothing else would stop it.
    slots = make_slots("distinct", 9, num_slots=3)
    too_big = torch.tensor([12, 6, 100], dtype=torch.int32, device=device)
    launch = LoRALaunch(block_k=16, block_n=16)
    out, want_out, y, want_y, y0 = run_both(
        slots, 16, [6, 12], 6, 3, 3, torch.float32, device, too_big, launch
    )
    assert rel_err(out, want_out) < REL_TOL[torch.float32]
    assert rel_err(y - y0, want_y - y0) < REL_TOL[torch.float32]


def test_padding_past_a_slots_rank_is_never_used_even_if_nan(device):
    """Slots are padded to R; whatever sits past an adapter's rank (NaN here) must not reach y."""
    num_tokens, hidden, widths, max_rank = 13, 32, [16, 8], 16
    slots = make_slots("with_minus_one", num_tokens, num_slots=3).to(device)
    ranks = torch.tensor([4, 16, 9], dtype=torch.int32, device=device)
    x = torch.randn(num_tokens, hidden, device=device)
    a = [torch.randn(3, max_rank, hidden, device=device) for _ in widths]
    b = [torch.randn(3, w, max_rank, device=device) for w in widths]
    for slot, rank in enumerate(ranks.tolist()):
        for t in a:
            t[slot, rank:] = float("nan")
        for t in b:
            t[slot, :, rank:] = float("nan")
    meta = make_lora_meta(slots, 3)
    scales = torch.rand(3, device=device)
    buf = torch.empty(len(widths), num_tokens, max_rank, device=device)
    lora_shrink(x, a, meta, buf, ranks, launch=LoRALaunch(block_k=16))
    buf[:, :, 15] = float("nan")  # expand must not read past the rank either
    y = torch.zeros(num_tokens, sum(widths), device=device)
    lora_expand(buf, b, meta, y, scales, ranks)
    want = torch.zeros_like(y)
    lora_expand_ref(buf, b, meta, want, scales, ranks)
    assert not torch.isnan(y[slots != 1]).any()
    keep = slots != 1  # slot 1 has rank 16: its last column of buf really is NaN
    assert rel_err(y[keep], want[keep]) < REL_TOL[torch.float32]


def test_more_slices_than_one_launch_and_block_m_32(device):
    slots = make_slots("skewed", 40, num_slots=3)
    out, want_out, y, want_y, y0 = run_both(
        slots, 16, [8, 8, 8, 8], 16, 3, 5, torch.float32, device, launch=LoRALaunch(block_m=32, block_k=16)
    )
    assert rel_err(out, want_out) < REL_TOL[torch.float32]
    assert rel_err(y - y0, want_y - y0) < REL_TOL[torch.float32]


def test_zero_tokens_is_a_no_op(device):
    slots = torch.zeros(0, dtype=torch.int32)
    out, _, y, _, _ = run_both(slots, 16, [8], 8, 2, 2, torch.float32, device)
    assert out.shape == (1, 0, 8) and y.shape == (0, 8)


def test_wrapper_rejects_mismatched_inputs(device):
    meta = make_lora_meta(torch.zeros(4, dtype=torch.int32, device=device), 2)
    x = torch.randn(4, 16, device=device)
    a = torch.randn(2, 8, 16, device=device, dtype=torch.float16)
    with pytest.raises(AssertionError):
        lora_shrink(x, [a], meta, torch.empty(1, 4, 8, device=device))
    with pytest.raises(AssertionError):
        lora_shrink(x, [a.float()], meta, torch.empty(1, 4, 8, device=device, dtype=torch.float16))
    other = make_lora_meta(torch.zeros(5, dtype=torch.int32, device=device), 2)
    with pytest.raises(AssertionError):
        lora_shrink(x, [a.float()], other, torch.empty(1, 4, 8, device=device))
    # A grouping that may name slot 2 against weights with slots 0 and 1 only: refused up front.
    wide = make_lora_meta(torch.tensor([0, 1, 2, 1], dtype=torch.int32, device=device), 3)
    with pytest.raises(AssertionError):
        lora_shrink(x, [a.float()], wide, torch.empty(1, 4, 8, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("mix", [*MIXES, "none"])
@pytest.mark.parametrize(
    "num_tokens,num_slots,max_rank", [(64, 64, 16), (256, 8, 64), (2048, 1, 8), (1, 1, 64)]
)
def test_llama3_8b_qkv_bf16(mix, num_tokens, num_slots, max_rank):
    slots = make_slots(mix, num_tokens, num_slots)
    out, want_out, y, want_y, y0 = run_both(
        slots, 4096, [4096, 1024, 1024], max_rank, num_slots, num_slots, torch.bfloat16, "cuda"
    )
    if mix != "none":
        assert rel_err(out, want_out) < REL_TOL[torch.bfloat16]
        assert rel_err(y.float() - y0.float(), want_y.float() - y0.float()) < REL_TOL[torch.bfloat16]
    untouched = (slots == -1).cuda()
    assert torch.equal(y[untouched], y0[untouched])


@pytest.mark.gpu
def test_llama3_8b_down_proj_mixed_ranks_bf16():
    slots = make_slots("with_minus_one", 300, 16)
    ranks = torch.randint(0, 65, (16,), dtype=torch.int32, device="cuda")
    out, want_out, y, want_y, y0 = run_both(slots, 14336, [4096], 64, 16, 16, torch.bfloat16, "cuda", ranks)
    assert rel_err(out, want_out) < REL_TOL[torch.bfloat16]
    assert rel_err(y.float() - y0.float(), want_y.float() - y0.float()) < REL_TOL[torch.bfloat16]
