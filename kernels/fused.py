"""Fused elementwise kernels of a decoder layer: residual add + RMSNorm, RoPE + KV-cache write, SiLU * mul.

Under CUDA-graph replay a decode step costs roughly one kernel's fixed latency per launch, and in plain
torch these three take ~30 small launches a layer (RMSNorm alone is 7). Each is one launch here.

Numerics follow the plain-torch references below (and so transformers) step by step: every place where
torch rounds to the activation dtype, these kernels round too; only the order of the RMSNorm sum differs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# ---------------------------------------------------------------------------------------------------
# References (the CPU path, and the definition the kernels are tested against).


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual); residual None means x alone (the first layer)."""
    h = x if residual is None else x + residual
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype), h


def rope_write_kv_ref(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> Tensor:
    """Rotate q and k of a fused qkv [T, (Hq + 2 Hkv) * D] (HF half-split layout, cos/sin [T, D]), write
    k and v into the paged cache at `slot_mapping` (-1 or past the cache: no write), return q [T, Hq, D]."""
    tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    q = _rotate(q.reshape(tokens, num_heads, head_dim), c, s)
    k = _rotate(k.reshape(tokens, num_kv_heads, head_dim), c, s)
    v = v.reshape(tokens, num_kv_heads, head_dim)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    keep = (slot_mapping >= 0) & (slot_mapping < num_slots)
    slots = slot_mapping[keep].to(torch.int64)
    blocks, offsets = slots // k_cache.shape[1], slots % k_cache.shape[1]
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)
    return q.contiguous()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_mul_ref(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for gate_up [T, 2I] = [gate | up] -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ---------------------------------------------------------------------------------------------------
# Triton kernels.


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, hidden, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)  # torch rounds the sum to the dtype
        tl.store(res_out_ptr + row * stride_ro + cols, h, mask=mask)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / hidden
    y = (hf * tl.rsqrt(var + eps)).to(h.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (y.to(tl.float32) * w.to(tl.float32)).to(h.dtype), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """Same contract as rms_norm_ref. x (and residual) [T, H], last dim contiguous; weight [H], x's dtype."""
    tokens, hidden = x.shape
    assert x.stride(1) == 1 and weight.shape == (hidden,) and weight.dtype == x.dtype
    out = torch.empty_like(x)
    if residual is None:
        res_in, res_out = x, x
    else:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
        res_in, res_out = residual, torch.empty_like(x)
    if tokens == 0:
        return out, res_out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(tokens,)](
        x, res_in, weight, out, res_out, hidden, eps,
        x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 512, 1), 16),
    )  # fmt: skip
    return out, res_out


@triton.jit
def _rope_write_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    num_heads, num_kv_heads, head_dim, half, block_size, num_slots,
    stride_t, stride_ct, stride_st, stride_qt, stride_qh,
    stride_cb, stride_cs, stride_ch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    # Program (token, head): heads [0, Hq) are query heads; head Hq + j rotates key head j and writes it
    # and value head j into the cache.
    t, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = tl.arange(0, BLOCK_HALF)
    mask = cols < half
    c1 = tl.load(cos_ptr + t * stride_ct + cols, mask=mask, other=0.0)
    c2 = tl.load(cos_ptr + t * stride_ct + half + cols, mask=mask, other=0.0)
    s1 = tl.load(sin_ptr + t * stride_st + cols, mask=mask, other=0.0)
    s2 = tl.load(sin_ptr + t * stride_st + half + cols, mask=mask, other=0.0)
    src = qkv_ptr + t * stride_t + head * head_dim  # k heads follow the q heads in the fused row
    x1 = tl.load(src + cols, mask=mask, other=0.0)
    x2 = tl.load(src + half + cols, mask=mask, other=0.0)
    dt = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    # x * cos + rotate_half(x) * sin, with torch's rounding after each product and the sum.
    p1 = (x1 * c1.to(tl.float32)).to(dt).to(tl.float32) + (-x2 * s1.to(tl.float32)).to(dt).to(tl.float32)
    p2 = (x2 * c2.to(tl.float32)).to(dt).to(tl.float32) + (x1 * s2.to(tl.float32)).to(dt).to(tl.float32)
    o1, o2 = p1.to(dt), p2.to(dt)
    if head < num_heads:
        dst = q_out_ptr + t * stride_qt + head * stride_qh
        tl.store(dst + cols, o1, mask=mask)
        tl.store(dst + half + cols, o2, mask=mask)
    else:
        slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        # -1 means "no write"; anything past the cache is a caller bug that must not become a stray write.
        if (slot >= 0) & (slot < num_slots):
            kvh = head - num_heads
            block, offset = slot // block_size, slot % block_size
            kdst = k_cache_ptr + block * stride_cb + offset * stride_cs + kvh * stride_ch
            tl.store(kdst + cols, o1, mask=mask)
            tl.store(kdst + half + cols, o2, mask=mask)
            vsrc = src + num_kv_heads * head_dim
            vdst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + kvh * stride_vch
            tl.store(vdst + cols, tl.load(vsrc + cols, mask=mask), mask=mask)
            tl.store(vdst + half + cols, tl.load(vsrc + half + cols, mask=mask), mask=mask)


def rope_write_kv(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> Tensor:
    """Same contract as rope_write_kv_ref. qkv [T, (Hq + 2 Hkv) * D] contiguous; cos/sin [T, D] in qkv's
    dtype, last dim contiguous; caches [num_blocks, block_size, Hkv, D] contiguous, qkv's dtype."""
    tokens, width = qkv.shape
    head_dim = k_cache.shape[-1]
    assert qkv.is_contiguous() and width == (num_heads + 2 * num_kv_heads) * head_dim and head_dim % 2 == 0
    assert cos.shape == sin.shape == (tokens, head_dim) and cos.stride(1) == 1 and sin.stride(1) == 1
    assert cos.dtype == sin.dtype == qkv.dtype == k_cache.dtype == v_cache.dtype
    assert k_cache.shape == v_cache.shape and k_cache.shape[2] == num_kv_heads
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert slot_mapping.shape == (tokens,) and slot_mapping.dtype in (torch.int64, torch.int32)
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    half = head_dim // 2
    _rope_write_kv_kernel[(tokens, num_heads + num_kv_heads)](
        qkv, cos, sin, q, k_cache, v_cache, slot_mapping,
        num_heads, num_kv_heads, head_dim, half, k_cache.shape[1], k_cache.shape[0] * k_cache.shape[1],
        qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=1,
    )  # fmt: skip
    return q


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, stride_g, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * stride_g + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # torch's silu rounds to the dtype before the product
    tl.store(
        out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask
    )


def silu_mul(gate_up: Tensor) -> Tensor:
    """Same contract as silu_mul_ref; gate_up [T, 2I] with a contiguous last dim."""
    tokens, width = gate_up.shape
    assert width % 2 == 0 and gate_up.stride(1) == 1
    inter = width // 2
    out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if tokens == 0:
        return out
    block = min(triton.next_power_of_2(inter), 2048)
    _silu_mul_kernel[(tokens, triton.cdiv(inter, block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out
