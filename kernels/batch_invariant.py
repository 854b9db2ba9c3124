"""Batch-invariant products for deterministic mode: a token's result never depends on the other tokens.

cuBLAS and the CPU BLAS pick their algorithm from the shapes (a [1, K] product takes another path than a
[64, K] one, and some split K across blocks), so the same row can round differently in different batches.
Here every output element is summed in one fixed order whatever the batch:
- `linear` (Triton): tiles of a fixed size, the whole K walked by one program in BLOCK_K steps, no split.
- `linear_rows_ref` (CPU): one [1, K] product per token, on a fresh copy of its row (so the BLAS sees the
  same shape and alignment every time); the LoRA references do the same with `per_token=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

# Fixed tiles (never chosen from the batch). 64 rows: a decode batch up to 64 reads each weight tile once
# (program_id 0 walks the row tiles, so a larger batch re-reads a tile while it is still in L2); 32 columns
# keep enough programs for the skinny products of small batches.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 32, 128


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, rows, cols, inner,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < rows, offs_n < cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, inner, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < inner
        xt = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        wt = tl.load(
            w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(xt, wt, input_precision=PRECISION)
    out = acc.to(out_ptr.dtype.element_ty)
    if HAS_BIAS:
        # Rounded first, then added in the output dtype: what F.linear's separate bias add does.
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0)
        out = (out.to(tl.float32) + bias.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(
        out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
        out,
        mask=m_mask[:, None] & n_mask[None, :],
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), batch-invariant. x [..., K], weight [N, K] contiguous, x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows, inner = x2.shape
    cols = weight.shape[0]
    assert weight.shape == (cols, inner) and weight.stride(1) == 1 and weight.dtype == x.dtype
    out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if rows:
        grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(cols, BLOCK_N))
        _linear_kernel[grid](
            x2, weight, bias if bias is not None else weight, out, rows, cols, inner,
            x2.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3,
        )  # fmt: skip
    return out.reshape(*lead, cols)


def linear_rows_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear one token at a time (the CPU path of deterministic mode)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    for t in range(x2.shape[0]):
        out[t] = F.linear(x2[t : t + 1].clone(), weight, bias)[0]
    return out.reshape(*lead, weight.shape[0])
