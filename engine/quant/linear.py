"""The Linear layers swapped into a loaded model: FP8 weights, and batch-invariant products.

Both keep nn.Linear's call (`proj(x)`), so engine/models/ and the LoRA path (`LoRABatch.linear` adds the
adapters' delta to whatever `proj(x)` returns, in the model dtype) are unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import fp8

log = logging.getLogger(__name__)

Matmul = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # F.linear's (x, weight, bias)


class Fp8Linear(nn.Module):
    """y = x @ (w8 * scale).T + bias with w8 float8_e4m3fn [O, I] and one float32 scale per output row.

    fp8_gemm: activations quantized per token (or with the checkpoint's static scale) and the product
    in FP8 (kernels/fp8.py). Otherwise the weight is dequantized at every call into a temporary of the
    model dtype and multiplied by `matmul`: memory stays at one byte a weight (the point of FP8), and
    the temporary costs one layer's worth of float weights at a time."""

    # Parameters (frozen), so that whatever counts a model's weight bytes counts one byte a weight here.
    weight: nn.Parameter  # [O, I] float8_e4m3fn
    weight_scale: nn.Parameter  # [O] float32

    def __init__(
        self,
        weight: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None,
        input_scale: Tensor | None,
        fp8_gemm: bool,
        matmul: Matmul = F.linear,
    ) -> None:
        super().__init__()
        assert weight.dtype == fp8.FP8 and weight.dim() == 2 and weight_scale.shape == weight.shape[:1]
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale.float().contiguous(), requires_grad=False)
        self.scale_row = self.weight_scale.data[None, :]  # [1, O], a view: torch._scaled_mm's row-wise layout
        self.bias = bias
        self.input_scale = None if input_scale is None else input_scale.float().reshape(1)
        self.fp8_gemm = fp8_gemm
        self.matmul = matmul

    def forward(self, x: Tensor) -> Tensor:
        if self.fp8_gemm:
            return fp8.fp8_linear(x, self.weight, self.scale_row, self.bias, self.input_scale)
        return self.matmul(x, fp8.dequantize(self.weight, self.weight_scale, x.dtype), self.bias)

    def extra_repr(self) -> str:
        gemm = "fp8" if self.fp8_gemm else "dequantize"
        return f"in={self.in_features}, out={self.out_features}, gemm={gemm}"


class InvariantLinear(nn.Module):
    """nn.Linear through a batch-invariant `matmul` (deterministic mode), same weight and bias."""

    def __init__(self, linear: nn.Linear, matmul: Matmul) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.matmul = matmul

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x, self.weight, self.bias)


def fp8_gemm_usable(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """Whether the FP8 product runs for this layer: hardware, a bf16 model (row-wise scaling's output
    dtype), shapes, and one trial product that matches the dequantized one (so an unsupported build
    falls back at load, never in the middle of a step or a CUDA-graph capture)."""
    if dtype != torch.bfloat16 or not fp8.fp8_gemm_supported(device):
        return False
    if not fp8.fp8_shape_ok(out_features, in_features):
        return False
    return _trial(device, out_features, in_features)


@functools.lru_cache(maxsize=64)
def _trial(device: torch.device, out_features: int, in_features: int) -> bool:
    """One trial product per (device, shape), remembered for the process."""
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(out_features, in_features, device=device, generator=gen) / in_features**0.5
    x = torch.randn(3, in_features, device=device, generator=gen).bfloat16()
    w8, scale = fp8.quantize_rows(w)
    try:
        got = fp8.fp8_linear(x, w8, scale[None, :].contiguous(), None, None).float()
    except RuntimeError as exc:  # an older torch or a build without row-wise scaling
        log.warning("FP8 GEMM unavailable (%s): dequantize path", exc)
        return False
    want = F.linear(x.float(), fp8.dequantize(w8, scale, torch.float32))
    err = float((got - want).norm() / want.norm().clamp(min=1e-6))
    if err >= 0.1:
        log.warning("FP8 GEMM [%d x %d] off by %.3g: dequantize path", out_features, in_features, err)
    return err < 0.1
