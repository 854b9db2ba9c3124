"""FP8 (e4m3) weights: per-row quantization, its inverse, and the FP8 GEMM of Hopper/Ada.

A weight [O, I] is stored as float8_e4m3fn with one float32 scale per output row (`w ~ w8 * scale[:, None]`).
Two ways to multiply by it:
- `fp8_linear`: activations quantized per token too (one Triton launch on CUDA), then torch._scaled_mm
  with row-wise scales on both sides (bf16 out: what row-wise scaling requires); compute capability >= 8.9.
- `dequantize` then an ordinary matmul in the model's dtype: everywhere else (CPU, CI, older GPUs).
  Activations are not quantized there, so that path equals a float model built from the dequantized weights.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# Activation scales are amax * (1 / 448), a multiplication: torch on CUDA divides a tensor by a Python
# scalar as a multiplication by its reciprocal and on the CPU as a division, so only the product is the
# same number on every device, in the kernel and in its reference.
INV_FP8_MAX = 1.0 / FP8_MAX
# Smallest scale: an all-zero row or token must not divide by zero.
_MIN_SCALE = 1e-12


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [O, I] float -> (fp8 [O, I], float32 scale [O]) with |w| / scale <= 448 per row."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)  # [O]
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """fp8 [O, I] and float32 scale [O] -> [O, I] in `dtype` (the product in float32, rounded once)."""
    return (weight.float() * scale[:, None]).to(dtype)


def quantize_tokens_ref(x: Tensor, static_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [T, I] -> (fp8 [T, I], float32 scale [T, 1]): per token (dynamic) or one given scale (static)."""
    xf = x.float()
    if static_scale is None:
        scale = (xf.abs().amax(dim=1, keepdim=True) * INV_FP8_MAX).clamp(min=_MIN_SCALE)  # [T, 1]
    else:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.contiguous()


@triton.jit
def _quantize_tokens_kernel(
    x_ptr, out_ptr, scale_ptr, static_ptr, cols, stride_x, stride_o,
    STATIC: tl.constexpr, FP8_MAX_C: tl.constexpr, INV_FP8_MAX_C: tl.constexpr, MIN_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per token: pass 1 finds the row's absolute max, pass 2 scales, rounds and stores.
    # div_rn: IEEE division, as torch's tensor / tensor, so the kernel and quantize_tokens_ref agree bit
    # for bit (the scale is a product for the same reason: see INV_FP8_MAX).
    row = tl.program_id(0).to(tl.int64)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(0, cols, BLOCK):
            offs = c + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + row * stride_x + offs, mask=offs < cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.max(amax, 0) * INV_FP8_MAX_C, MIN_SCALE)
    for c in range(0, cols, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_x + offs, mask=offs < cols, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(v, scale), -FP8_MAX_C, FP8_MAX_C)
        tl.store(out_ptr + row * stride_o + offs, q.to(out_ptr.dtype.element_ty), mask=offs < cols)
    tl.store(scale_ptr + row, scale)


def quantize_tokens(x: Tensor, static_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """quantize_tokens_ref in one launch on CUDA; x [T, I] with contiguous rows."""
    if not x.is_cuda:
        return quantize_tokens_ref(x, static_scale)
    assert x.dim() == 2 and x.stride(1) == 1
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    if x.shape[0]:
        # A whole row in one block up to 16K columns (Llama-3-8B's widest input is 14,336): each loop
        # runs once and the second pass re-reads the row from cache, so decode (one program per token)
        # pays one row's latency, not a chain of chunks. More warps for wider rows keep registers low.
        block = min(16384, triton.next_power_of_2(x.shape[1]))
        _quantize_tokens_kernel[(x.shape[0],)](
            x, out, scale, static_scale if static_scale is not None else scale, x.shape[1],
            x.stride(0), out.stride(0),
            STATIC=static_scale is not None, FP8_MAX_C=FP8_MAX, INV_FP8_MAX_C=INV_FP8_MAX,
            MIN_SCALE=_MIN_SCALE,
            BLOCK=block, num_warps=max(4, min(16, block // 1024)),
        )  # fmt: skip
    return out, scale


@functools.lru_cache(maxsize=8)
def fp8_gemm_supported(device: torch.device) -> bool:
    """torch._scaled_mm with row-wise scales runs here: CUDA, compute capability >= 8.9 (Ada, Hopper)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_shape_ok(out_features: int, in_features: int) -> bool:
    """torch._scaled_mm wants both weight dimensions to be multiples of 16."""
    return out_features % 16 == 0 and in_features % 16 == 0


def fp8_linear(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor | None
) -> Tensor:
    """x [T, I] bf16 @ (fp8 weight [O, I] * scale [O]).T (+ bias) -> [T, O] bf16, the product in FP8.

    weight_scale must be float32 [1, O] (row-wise: one per output column of the product)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*lead, weight.shape[0])
    xq, x_scale = quantize_tokens(x2, input_scale)  # [T, I] fp8, [T, 1] float32
    # weight.t() is [I, O] column-major: the layout _scaled_mm wants for its second operand.
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[0])
