"""Deterministic mode's kernels: a row's result is the same bits whatever the rest of the batch.

On CPU the Triton kernels run in the interpreter (float32); on a GPU compiled, in bf16 too, where cuBLAS
itself is not batch-invariant.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.ops import DETERMINISTIC_LORA
from kernels.batch_invariant import linear, linear_rows_ref
from kernels.lora import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref, make_lora_meta
from tests.kernels.conftest import ON_GPU

DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_rows_do_not_depend_on_the_batch(device: str, dtype: torch.dtype, bias: bool) -> None:
    inner, cols = (320, 96) if device == "cpu" else (4096, 1024)
    x = torch.randn(70, inner, device=device, dtype=dtype)
    w = torch.randn(cols, inner, device=device, dtype=dtype) / inner**0.5
    b = torch.randn(cols, device=device, dtype=dtype) if bias else None
    full = linear(x, w, b)
    assert rel(full, F.linear(x.float(), w.float(), None if b is None else b.float())) < TOL[dtype]
    for rows in (1, 3, 33):
        # The interpreter's tl.dot is numpy's matmul, whose result for a row can follow the row's place
        # in the tile; compiled, a row's sum never does. So on CPU the rows keep their places.
        part = slice(0, rows) if device == "cpu" else slice(70 - rows, 70)
        assert torch.equal(linear(x[part].clone(), w, b), full[part])


def test_rows_ref_does_not_depend_on_the_batch() -> None:
    x, w = torch.randn(9, 64), torch.randn(40, 64)
    full = linear_rows_ref(x, w)
    assert torch.allclose(full, F.linear(x, w), atol=1e-5)
    assert torch.equal(linear_rows_ref(x[4:5], w), full[4:5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_token_alone_equals_token_in_batch(device: str, dtype: torch.dtype) -> None:
    """Token 0 (slot 1) alone, then among 40 tokens of three slots and base rows: same bits."""
    hidden, rank, width, slots = 256, 16, 128, 3
    a = [torch.randn(slots, rank, hidden, device=device, dtype=dtype) / 8 for _ in range(2)]
    b = [torch.randn(slots, width, rank, device=device, dtype=dtype) / 4 for _ in range(2)]
    scales = torch.rand(slots, device=device)
    x = torch.randn(40, hidden, device=device, dtype=dtype)
    token_slots = torch.tensor([1] + [i % 4 - 1 for i in range(39)], device=device)
    y0 = torch.randn(40, 2 * width, device=device, dtype=dtype)

    def run(n: int) -> torch.Tensor:
        meta = make_lora_meta(token_slots[:n], slots)
        buf = torch.empty(2, n, rank, device=device)
        y = y0[:n].clone()
        if device == "cpu":
            lora_shrink_ref(x[:n], a, meta, buf, per_token=True)
            lora_expand_ref(buf, b, meta, y, scales, per_token=True)
        else:
            lora_shrink(x[:n], a, meta, buf, launch=DETERMINISTIC_LORA)
            lora_expand(buf, b, meta, y, scales, launch=DETERMINISTIC_LORA)
        return y

    alone, batch = run(1), run(40)
    assert torch.equal(alone[0], batch[0])


def test_deterministic_lora_launch_matches_reference(device: str) -> None:
    """The fixed launch is still the same product (Triton interpreter on CPU)."""
    hidden, rank, width, slots, tokens = 192, 8, 64, 2, 24
    a = [torch.randn(slots, rank, hidden, device=device)]
    b = [torch.randn(slots, width, rank, device=device)]
    x = torch.randn(tokens, hidden, device=device)
    meta = make_lora_meta(torch.randint(-1, slots, (tokens,), device=device), slots)
    scales = torch.rand(slots, device=device)
    buf, ref_buf = torch.empty(1, tokens, rank, device=device), torch.empty(1, tokens, rank, device=device)
    lora_shrink(x, a, meta, buf, launch=DETERMINISTIC_LORA)
    lora_shrink_ref(x, a, meta, ref_buf, per_token=True)
    assert rel(buf, ref_buf) < 1e-5
    y, ref_y = torch.zeros(tokens, width, device=device), torch.zeros(tokens, width, device=device)
    lora_expand(buf, b, meta, y, scales, launch=DETERMINISTIC_LORA)
    lora_expand_ref(ref_buf, b, meta, ref_y, scales, per_token=True)
    assert torch.allclose(y, ref_y, atol=1e-4)
