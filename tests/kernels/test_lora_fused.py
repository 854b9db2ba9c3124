"""The one-launch multi-LoRA kernel (shrink + expand, kernels/lora_fused.py) against the references.

On CPU these run in Triton's interpreter (fp32/fp16, tiny shapes); on a GPU the same cases run compiled,
plus bf16 at Llama-3-8B sizes, where it must also agree with the two-launch path.
"""

from __future__ import annotations

import pytest
import torch

from kernels.lora import LoRALaunch, lora_expand, lora_shrink, make_lora_meta
from kernels.lora_fused import FUSED_MAX_PER_SEGMENT, FUSED_MAX_TOKENS, lora_fused, lora_fused_ref, use_fused
from tests.kernels.test_lora import MIXES, REL_TOL, make_slots, rel_err


def inputs(slots, hidden, widths, max_rank, num_slots, dtype, device, nan_past=None):
    """x, A and B per slice, scales, y0; with nan_past (ranks), NaN in every slot's padding past its rank."""
    x = torch.randn(slots.shape[0], hidden, dtype=dtype, device=device)
    a = [torch.randn(num_slots, max_rank, hidden, dtype=dtype, device=device) / hidden**0.5 for _ in widths]
    b = [torch.randn(num_slots, w, max_rank, dtype=dtype, device=device) for w in widths]
    if nan_past is not None:
        for slot, rank in enumerate(nan_past.tolist()):
            for t in a:
                t[slot, rank:] = float("nan")
            for t in b:
                t[slot, :, rank:] = float("nan")
    scales = torch.rand(num_slots, device=device) + 0.5
    y0 = torch.randn(slots.shape[0], sum(widths), dtype=dtype, device=device)
    return x, a, b, scales, y0


def run(slots, hidden, widths, max_rank, num_slots, dtype, device, ranks=None, launch=None, nan=False):
    """(fused y, reference y, y0) on the same inputs."""
    x, a, b, scales, y0 = inputs(
        slots, hidden, widths, max_rank, num_slots, dtype, device, ranks if nan else None
    )
    meta = make_lora_meta(slots.to(device), num_slots)
    y, want = y0.clone(), y0.clone()
    lora_fused(x, a, b, meta, y, scales, ranks, launch=launch)
    lora_fused_ref(x, a, b, meta, want, scales, ranks)
    return y, want, y0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_fused_matches_reference(mix, num_tokens, dtype, device):
    """40 tokens: segments longer than a token block (the program loops over them)."""
    slots = make_slots(mix, num_tokens, num_slots=4)
    y, want, y0 = run(slots, 40, [24, 8, 8], 8, 4, dtype, device, launch=LoRALaunch(block_k=16, block_n=16))
    assert rel_err(y - y0, want - y0) < REL_TOL[dtype]
    untouched = (slots == -1).to(device)
    assert torch.equal(y[untouched], y0[untouched]), "slot -1 rows must stay bit-identical"


@pytest.mark.parametrize("tiles", [1, 2, 5])
@pytest.mark.parametrize("widths", [[16, 40], [8, 8, 8, 8, 24]], ids=["two-slices", "five-slices"])
def test_column_groups_and_slices_cover_every_column(tiles, widths, device):
    """Column tiles walked `tiles` at a time (40 leaves a partial tile); five slices take two launches."""
    slots = torch.tensor([2] * 19 + [0, 1, -1, 1, -1], dtype=torch.int32)[torch.randperm(24)]
    launch = LoRALaunch(block_k=16, block_n=16, tiles_per_program=tiles)
    y, want, y0 = run(slots, 48, widths, 16, 3, torch.float32, device, launch=launch)
    assert rel_err(y - y0, want - y0) < REL_TOL[torch.float32]


@pytest.mark.parametrize("widths,max_rank", [([8, 16], 8), ([12, 6], 6)], ids=["aligned", "unaligned"])
def test_ranks_mask_and_nan_padding_never_leaks(widths, max_rank, device):
    slots = make_slots("with_minus_one", 17, num_slots=4)
    ranks = torch.tensor([max_rank, 2, 0, 5], dtype=torch.int32, device=device)
    y, want, y0 = run(
        slots, 24, widths, max_rank, 4, torch.float32, device, ranks, LoRALaunch(block_k=16), nan=True
    )
    assert not torch.isnan(y).any()
    assert rel_err(y - y0, want - y0) < REL_TOL[torch.float32]
    rank0 = (slots == 2).to(device)
    assert torch.equal(y[rank0], y0[rank0])


def test_ranks_past_r_are_clamped_to_r(device):
    slots = make_slots("distinct", 9, num_slots=3)
    too_big = torch.tensor([12, 6, 100], dtype=torch.int32, device=device)
    y, want, y0 = run(
        slots, 16, [6, 12], 6, 3, torch.float32, device, too_big, LoRALaunch(block_k=16, block_n=16)
    )
    assert rel_err(y - y0, want - y0) < REL_TOL[torch.float32]


def test_zero_tokens_and_mismatched_inputs(device):
    slots = torch.zeros(0, dtype=torch.int32)
    y, _, _ = run(slots, 16, [8], 8, 2, torch.float32, device)
    assert y.shape == (0, 8)
    meta = make_lora_meta(torch.zeros(4, dtype=torch.int32, device=device), 2)
    x, a, b = (
        torch.randn(4, 16, device=device),
        torch.randn(2, 8, 16, device=device),
        torch.randn(2, 8, 8, device=device),
    )
    scales = torch.ones(2, device=device)
    with pytest.raises(AssertionError):
        lora_fused(x, [a.half()], [b], meta, torch.zeros(4, 8, device=device), scales)
    with pytest.raises(AssertionError):
        lora_fused(x, [a], [b], meta, torch.zeros(4, 9, device=device), scales)
    wide = make_lora_meta(torch.tensor([0, 1, 2, 1], dtype=torch.int32, device=device), 3)
    with pytest.raises(AssertionError):
        lora_fused(x, [a], [b], wide, torch.zeros(4, 8, device=device), scales)


def test_use_fused_takes_decode_shapes_only():
    assert use_fused(1, 1) and use_fused(64, 64) and use_fused(128, 8)
    assert use_fused(FUSED_MAX_TOKENS, FUSED_MAX_TOKENS // FUSED_MAX_PER_SEGMENT)
    assert not use_fused(0, 0)
    assert not use_fused(64, 1)  # one adapter's 64 tokens: the two-launch path spreads them better
    assert not use_fused(FUSED_MAX_TOKENS + 1, FUSED_MAX_TOKENS + 1)  # prefill-sized


@pytest.mark.gpu
@pytest.mark.parametrize("mix", [*MIXES, "none"])
@pytest.mark.parametrize(
    "num_tokens,num_slots,max_rank,widths,hidden",
    [(64, 64, 16, [4096, 1024, 1024], 4096), (128, 8, 64, [4096, 1024, 1024], 4096),
     (64, 64, 16, [4096], 4096), (32, 32, 16, [14336, 14336], 4096), (1, 1, 64, [4096], 14336)],
)  # fmt: skip
def test_llama3_8b_bf16_matches_reference_and_two_launches(
    mix, num_tokens, num_slots, max_rank, widths, hidden
):
    slots = make_slots(mix, num_tokens, num_slots)
    x, a, b, scales, y0 = inputs(slots, hidden, widths, max_rank, num_slots, torch.bfloat16, "cuda")
    meta = make_lora_meta(slots.cuda(), num_slots)
    y, want, two = y0.clone(), y0.clone(), y0.clone()
    lora_fused(x, a, b, meta, y, scales)
    lora_fused_ref(x, a, b, meta, want, scales)
    buf = torch.empty(len(widths), num_tokens, max_rank, device="cuda")
    lora_shrink(x, a, meta, buf)
    lora_expand(buf, b, meta, two, scales)
    if mix != "none":
        assert rel_err(y.float() - y0.float(), want.float() - y0.float()) < REL_TOL[torch.bfloat16]
        # Same math as the two launches: float32 sums, h rounded once; only the sum order differs.
        assert rel_err(y.float() - y0.float(), two.float() - y0.float()) < 1e-2
    untouched = (slots == -1).cuda()
    assert torch.equal(y[untouched], y0[untouched])
