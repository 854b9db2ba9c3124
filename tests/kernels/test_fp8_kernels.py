"""kernels/fp8.py: per-row weight quantization everywhere; on a GPU with FP8 (compute capability >= 8.9)
the per-token activation kernel and the row-wise-scaled FP8 product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import fp8

needs_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or not fp8.fp8_gemm_supported(torch.device("cuda")),
    reason="needs a CUDA GPU with compute capability >= 8.9",
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_token_quantization_reference() -> None:
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 500.0])[:, None]
    q, scale = fp8.quantize_tokens_ref(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    assert torch.equal(q[3].float(), torch.zeros(64))
    back = q.float() * scale
    assert rel(back[[0, 1, 2, 4]], x[[0, 1, 2, 4]]) < 0.05
    qs, ss = fp8.quantize_tokens_ref(x, torch.tensor([0.5]))
    assert torch.equal(ss, torch.full((5, 1), 0.5)) and qs.float().abs().max() == 448  # clipped, not inf


@pytest.mark.gpu
@needs_fp8
@pytest.mark.parametrize("cols", [4096, 14336, 20000])
@pytest.mark.parametrize("static", [False, True])
def test_token_kernel_equals_reference(static: bool, cols: int) -> None:
    x = torch.randn(33, cols, device="cuda", dtype=torch.bfloat16) * 3
    s = torch.tensor([0.02], device="cuda") if static else None
    q, scale = fp8.quantize_tokens(x, s)
    q_ref, scale_ref = fp8.quantize_tokens_ref(x, s)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
@needs_fp8
@pytest.mark.parametrize("tokens", [1, 32, 128, 500])
def test_fp8_linear_close_to_dequantized(tokens: int) -> None:
    w = torch.randn(1024, 4096, device="cuda") / 64
    w8, scale = fp8.quantize_rows(w)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    got = fp8.fp8_linear(x, w8, scale[None, :].contiguous(), bias, None)
    want = F.linear(x.float(), fp8.dequantize(w8, scale, torch.float32), bias.float())
    err = rel(got, want)
    print(f"T={tokens}: FP8 product vs dequantized float32: relative error {err:.2e}")
    assert got.dtype == torch.bfloat16 and err < 0.05


@pytest.mark.parametrize("block", [1024, 4096], ids=["chunked", "one-block"])
@pytest.mark.parametrize("static", [False, True])
def test_token_kernel_logic_in_float32(device: str, static: bool, block: int) -> None:
    """The per-token kernel's two passes, masks and static branch with a float32 output (the interpreter
    has no FP8; the FP8 store itself is checked on a GPU above)."""
    x = (
        torch.randn(5, 3000, device=device)
        * torch.tensor([1e-3, 1.0, 30.0, 0.0, 500.0], device=device)[:, None]
    )
    s = torch.tensor([0.02], device=device) if static else None
    out = torch.empty_like(x)
    scale = torch.empty(5, 1, device=device)
    fp8._quantize_tokens_kernel[(5,)](
        x, out, scale, s if s is not None else scale, x.shape[1], x.stride(0), out.stride(0),
        STATIC=static, FP8_MAX_C=fp8.FP8_MAX, INV_FP8_MAX_C=fp8.INV_FP8_MAX, MIN_SCALE=fp8._MIN_SCALE,
        BLOCK=block,
    )  # fmt: skip
    want_scale = (
        s.expand(5, 1)
        if s is not None
        else (x.abs().amax(1, keepdim=True) * fp8.INV_FP8_MAX).clamp(min=1e-12)
    )
    assert torch.equal(scale, want_scale)
    assert torch.equal(out, (x / want_scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX))


def _scaled_mm_runs(device: str) -> bool:
    try:
        a = torch.zeros(1, 16, device=device).to(fp8.FP8)
        b = torch.zeros(16, 16, device=device).to(fp8.FP8)
        one = torch.ones(1, 1, device=device)
        torch._scaled_mm(
            a, b.t(), scale_a=one, scale_b=torch.ones(1, 16, device=device), out_dtype=torch.bfloat16
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_semantics(device: str, static: bool) -> None:
    """Row-wise scales on both sides, bias after, static or dynamic activation scales: wherever this
    torch runs torch._scaled_mm (CPU builds do too), against the dequantized float32 product."""
    if not _scaled_mm_runs(device):
        pytest.skip("torch._scaled_mm with row-wise scales does not run here")
    w = torch.randn(96, 256, device=device) / 16 * torch.linspace(0.1, 3, 96, device=device)[:, None]
    w8, scale = fp8.quantize_rows(w)
    x = torch.randn(2, 3, 256, device=device).bfloat16()  # a leading batch shape too
    bias = torch.randn(96, device=device).bfloat16()
    s = torch.tensor([0.01], device=device) if static else None
    got = fp8.fp8_linear(x, w8, scale[None, :], bias, s)
    assert got.shape == (2, 3, 96) and got.dtype == torch.bfloat16
    want = F.linear(x.float(), fp8.dequantize(w8, scale, torch.float32), bias.float())
    assert rel(got, want) < 0.06
    # The activation rounding is what separates them: with x on the FP8 grid the product is (nearly) exact.
    xq, xs = fp8.quantize_tokens_ref(x.reshape(6, 256), s)
    exact = F.linear(
        (xq.float() * xs).reshape(2, 3, 256), fp8.dequantize(w8, scale, torch.float32), bias.float()
    )
    assert rel(got, exact) < 0.01
