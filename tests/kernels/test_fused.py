"""Fused residual-add + RMSNorm, RoPE + KV write and SiLU * mul against their torch references.

On CPU (Triton's interpreter) the kernels must equal the references bit for bit except where only the
order of a sum differs (RMSNorm); that checks every rounding step is the one torch makes. On a GPU the
compiler may contract a multiply-add, so the bound there is the usual relative error, plus bf16 at
Llama-3-8B sizes.
"""

from __future__ import annotations

import pytest
import torch

from kernels.fused import rms_norm, rms_norm_ref, rope_write_kv, rope_write_kv_ref, silu_mul, silu_mul_ref
from tests.kernels.conftest import ON_GPU
from tests.kernels.test_lora import REL_TOL, rel_err

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def close(out: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if exact and not ON_GPU:
        assert torch.equal(out, ref), f"max diff {(out.float() - ref.float()).abs().max()}"
    else:
        assert rel_err(out, ref) < REL_TOL[out.dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 80), (3, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, tokens: int, hidden: int, with_residual: bool, device: str) -> None:
    x = torch.randn(tokens, hidden, dtype=dtype, device=device) * 3
    residual = torch.randn(tokens, hidden, dtype=dtype, device=device) if with_residual else None
    weight = torch.rand(hidden, dtype=dtype, device=device) + 0.5
    x_before = x.clone()
    out, res = rms_norm(x, weight, 1e-5, residual)
    want_out, want_res = rms_norm_ref(x, weight, 1e-5, residual)
    close(out, want_out, exact=False)
    assert torch.equal(res, want_res), "the residual sum must round exactly as torch's add"
    assert torch.equal(x, x_before), "inputs are never written"


def test_rms_norm_reads_a_strided_view(device: str) -> None:
    """A row-strided view (e.g. the last token of each sequence) must not be read as contiguous."""
    full = torch.randn(6, 96, dtype=torch.float32, device=device)
    x = full[::2, :64]
    weight = torch.rand(64, device=device)
    out, _ = rms_norm(x, weight, 1e-6, None)
    close(out, rms_norm_ref(x, weight, 1e-6, None)[0], exact=False)


ROPE_CASES = {
    "llama_like": (4, 2, 16),  # Hq, Hkv, D
    "mha": (2, 2, 8),
    "odd_half": (3, 1, 12),  # D/2 = 6: not a power of two
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_write_kv(dtype: torch.dtype, case: str, device: str) -> None:
    hq, hkv, d = ROPE_CASES[case]
    tokens, num_blocks, block_size = 6, 5, 4
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    positions = torch.tensor([0, 3, 7, 8, 100, 2048], device=device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    # -1: no write; 20 = num_blocks * block_size: past the cache, must be dropped, never written anywhere.
    slots = torch.tensor([5, -1, 0, 19, 20, 11], dtype=torch.int64, device=device)
    caches = [torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device) for _ in range(2)]
    k_ref, v_ref = (c.clone() for c in caches)
    k_out, v_out = (c.clone() for c in caches)
    q = rope_write_kv(qkv, cos, sin, k_out, v_out, slots, hq, hkv)
    want_q = rope_write_kv_ref(qkv, cos, sin, k_ref, v_ref, slots, hq, hkv)
    close(q, want_q, exact=True)
    assert q.is_contiguous() and q.shape == (tokens, hq, d)
    close(k_out, k_ref, exact=True)
    assert torch.equal(v_out, v_ref), "v is copied, not computed"
    written = {5, 0, 19, 11}
    for slot in range(num_blocks * block_size):
        if slot not in written:
            b, o = divmod(slot, block_size)
            assert torch.equal(k_out[b, o], caches[0][b, o]) and torch.equal(v_out[b, o], caches[1][b, o])


@pytest.mark.skipif(not ON_GPU, reason="Llama-3-8B sizes in bf16 need a GPU (the interpreter is too slow)")
def test_rope_write_kv_llama3_sizes(device: str) -> None:
    hq, hkv, d, tokens = 32, 8, 128, 64
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=torch.bfloat16, device=device)
    emb = torch.rand(tokens, d, device=device) * 100
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    slots = torch.randperm(256, device=device)[:tokens]
    k_ref, v_ref = (torch.zeros(16, 16, hkv, d, dtype=torch.bfloat16, device=device) for _ in range(2))
    k_out, v_out = k_ref.clone(), v_ref.clone()
    q = rope_write_kv(qkv, cos, sin, k_out, v_out, slots, hq, hkv)
    close(q, rope_write_kv_ref(qkv, cos, sin, k_ref, v_ref, slots, hq, hkv), exact=False)
    close(k_out, k_ref, exact=False)
    assert torch.equal(v_out, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 48), (4, 3000)])  # 3000: more than one column block
def test_silu_mul(dtype: torch.dtype, tokens: int, inter: int, device: str) -> None:
    gate_up = torch.randn(tokens, 2 * inter, dtype=dtype, device=device) * 4
    close(silu_mul(gate_up), silu_mul_ref(gate_up), exact=False)


def test_empty_batches(device: str) -> None:
    """A step with no tokens launches nothing and returns empty results of the right shapes."""
    x = torch.empty(0, 64, device=device)
    out, res = rms_norm(x, torch.ones(64, device=device), 1e-6, None)
    assert out.shape == res.shape == (0, 64)
    assert silu_mul(torch.empty(0, 32, device=device)).shape == (0, 16)
    cache = torch.zeros(2, 4, 1, 8, device=device)
    q = rope_write_kv(
        torch.empty(0, 32, device=device),
        torch.empty(0, 8, device=device),
        torch.empty(0, 8, device=device),
        cache,
        cache.clone(),
        torch.empty(0, dtype=torch.int64, device=device),
        2,
        1,
    )
    assert q.shape == (0, 2, 8) and not cache.any()
