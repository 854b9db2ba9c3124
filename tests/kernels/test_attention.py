"""Triton paged attention and KV writes against the references, on fresh random inputs.

On CPU these run in Triton's interpreter (fp32/fp16, tiny shapes); on a GPU the same cases run compiled,
plus bf16 at Llama-3-8B sizes (32 query heads, 8 KV heads, head dim 128, blocks of 16).
"""

from __future__ import annotations

import pytest
import torch

from kernels.attention import paged_attention, paged_attention_ref, write_kv, write_kv_ref
from tests.kernels.test_lora import REL_TOL, rel_err


def make_batch(q_lens, ctx_lens, hq, hkv, d, block_size, dtype, device, spare_blocks=3):
    """A paged cache holding each sequence's context in scrambled, non-shared blocks, plus its queries."""
    assert all(c >= q for q, c in zip(q_lens, ctx_lens, strict=True))
    per_seq = [-(-c // block_size) for c in ctx_lens]
    max_blocks = max(per_seq) + 1  # a spare column: tables are wider than any sequence needs
    num_blocks = sum(per_seq) + spare_blocks
    order = torch.randperm(num_blocks)
    k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    tables = torch.zeros(len(q_lens), max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = order[used : used + n]
        tables[b, n:] = order[-1]  # garbage the kernel must never read as context
        used += n
    q = torch.randn(sum(q_lens), hq, d, dtype=dtype, device=device)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables.to(device), seq_lens, starts


CASES = {
    "decode": ([1, 1, 1], [1, 17, 40]),
    "prefill": ([5, 9], [5, 9]),
    "extend_mixed": ([3, 1, 6, 2], [10, 1, 6, 33]),
    "empty_sequence_in_batch": ([0, 4, 0], [7, 12, 3]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (2, 2), (8, 1)], ids=["gqa2", "gqa3", "mha", "mqa8"])
def test_paged_attention_matches_reference(case, heads, dtype, device):
    q_lens, ctx_lens = CASES[case]
    q, kc, vc, tables, seq_lens, starts = make_batch(q_lens, ctx_lens, *heads, 16, 4, dtype, device)
    out = paged_attention(q, kc, vc, tables, seq_lens, starts, scale=0.25, block_n=16)
    want = paged_attention_ref(q, kc, vc, tables, seq_lens, starts, scale=0.25)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, want) < REL_TOL[dtype]


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_context_merges_to_the_same_result(num_splits, device):
    q, kc, vc, tables, seq_lens, starts = make_batch(
        [1, 3, 1], [50, 21, 2], 4, 1, 8, 8, torch.float32, device
    )
    out = paged_attention(q, kc, vc, tables, seq_lens, starts, 0.3, num_splits=num_splits, block_n=16)
    want = paged_attention_ref(q, kc, vc, tables, seq_lens, starts, 0.3)
    assert rel_err(out, want) < REL_TOL[torch.float32]


def test_odd_head_dim_and_block_size(device):
    q, kc, vc, tables, seq_lens, starts = make_batch([2, 1], [13, 7], 4, 4, 24, 3, torch.float32, device)
    out = paged_attention(q, kc, vc, tables, seq_lens, starts, 0.2, block_n=16)
    want = paged_attention_ref(q, kc, vc, tables, seq_lens, starts, 0.2)
    assert rel_err(out, want) < REL_TOL[torch.float32]


def test_cache_write_then_attend_equals_dense_causal_attention(device):
    """The engine's sequence of calls: write this step's K/V into the pages, then attend over them."""
    hq, hkv, d, bs, n = 4, 2, 16, 4, 11
    q, kc, vc, tables, seq_lens, starts = make_batch([n], [n], hq, hkv, d, bs, torch.float32, device)
    k, v = torch.randn(n, hkv, d, device=device), torch.randn(n, hkv, d, device=device)
    pos = torch.arange(n, device=device)
    slots = tables[0].to(torch.int64)[pos // bs] * bs + pos % bs
    write_kv(k, v, kc, vc, slots)
    out = paged_attention(q, kc, vc, tables, seq_lens, starts, d**-0.5)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True,
    ).transpose(0, 1)  # fmt: skip
    assert rel_err(out, dense) < REL_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_matches_reference_with_strided_views_and_skips(dtype, device):
    num_tokens, hkv, d = 9, 2, 8
    qkv = torch.randn(num_tokens, (4 + 2 * hkv) * d, dtype=dtype, device=device)
    k = qkv[:, 4 * d : (4 + hkv) * d].view(num_tokens, hkv, d)  # non-contiguous views, as the model makes
    v = qkv[:, (4 + hkv) * d :].view(num_tokens, hkv, d)
    slots = torch.randperm(6 * 4, device=device)[:num_tokens]
    slots[[1, 5]] = -1
    k_cache, v_cache = (torch.randn(6, 4, hkv, d, dtype=dtype, device=device) for _ in range(2))
    caches = [k_cache, v_cache, k_cache.clone(), v_cache.clone()]
    write_kv(k, v, caches[0], caches[1], slots)
    write_kv_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_write_kv_never_writes_past_the_cache(device):
    store = torch.randn(8, 4, 2, 8, device=device)
    guard = store[6:].clone()
    k_cache = store[:6]  # the cache is the first 6 blocks; the rest of the allocation is someone else's
    v_cache = torch.zeros(6, 4, 2, 8, device=device)
    k, v = torch.randn(3, 2, 8, device=device), torch.randn(3, 2, 8, device=device)
    write_kv(k, v, k_cache, v_cache, torch.tensor([6 * 4, 5, 6 * 4 + 9], device=device))
    assert torch.equal(store[6:], guard), "a slot past the cache must not be written"
    assert torch.equal(k_cache[1, 1], k[1]) and torch.equal(v_cache[1, 1], v[1])


def test_block_ids_outside_the_cache_are_never_read(device):
    # The second block id points past the cache, where the allocation holds NaN: its keys must count as
    # absent, so the one query sees exactly the first block's 4 keys.
    hq, hkv, d, bs = 4, 2, 16, 4
    store = torch.randn(5, bs, hkv, d, device=device)
    store[3:] = float("nan")
    k_cache, v_cache = store[:3], store[:3].clone()
    tables = torch.tensor([[1, 3]], dtype=torch.int32, device=device)
    q = torch.randn(1, hq, d, device=device)
    out = paged_attention(
        q, k_cache, v_cache, tables, torch.tensor([8], dtype=torch.int32, device=device),
        torch.tensor([0, 1], dtype=torch.int32, device=device), 0.3, block_n=16,
    )  # fmt: skip
    keys = k_cache[1].repeat_interleave(2, dim=1).transpose(0, 1)  # [Hq, 4, D]
    values = v_cache[1].repeat_interleave(2, dim=1).transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[:, None], keys[:, None], values[:, None], scale=0.3
    )
    assert not torch.isnan(out).any()
    assert rel_err(out, want[:, 0].transpose(0, 1)) < REL_TOL[torch.float32]


def test_zero_tokens(device):
    q, kc, vc, tables, seq_lens, starts = make_batch([0], [3], 2, 2, 8, 4, torch.float32, device)
    assert paged_attention(q, kc, vc, tables, seq_lens, starts, 1.0).shape == (0, 2, 8)
    write_kv(q[:, :2], q[:, :2], kc, vc, torch.zeros(0, dtype=torch.int64, device=device))


def test_rejects_bad_inputs(device):
    q, kc, vc, tables, seq_lens, starts = make_batch([1], [3], 4, 2, 8, 4, torch.float32, device)
    with pytest.raises(AssertionError):
        paged_attention(q, kc, vc, tables.long(), seq_lens, starts, 1.0)
    with pytest.raises(AssertionError):
        paged_attention(q.half(), kc, vc, tables, seq_lens, starts, 1.0)
    with pytest.raises(AssertionError):
        paged_attention(q[:, :3], kc, vc, tables, seq_lens, starts, 1.0)  # 3 query heads over 2 KV heads


@pytest.mark.gpu
@pytest.mark.parametrize(
    "q_lens,ctx_lens",
    [
        ([1] * 32, torch.randint(1, 4097, (32,)).tolist()),  # decode over long, ragged contexts
        ([1], [4096]),  # one sequence: the split path
        ([512, 1, 37], [512, 3000, 700]),  # prefill + decode + extend over a cached prefix
        ([2048], [2048]),
    ],
    ids=["decode32", "decode1", "mixed", "prefill2048"],
)
def test_llama3_8b_bf16(q_lens, ctx_lens):
    q, kc, vc, tables, seq_lens, starts = make_batch(q_lens, ctx_lens, 32, 8, 128, 16, torch.bfloat16, "cuda")
    out = paged_attention(q, kc, vc, tables, seq_lens, starts, 128**-0.5)
    want = paged_attention_ref(q, kc, vc, tables, seq_lens, starts, 128**-0.5)
    assert rel_err(out, want) < REL_TOL[torch.bfloat16]
