"""The plain-torch references and the step metadata, checked against a per-token loop."""

from __future__ import annotations

import pytest
import torch

from kernels.attention import paged_attention_ref, write_kv_ref
from kernels.lora import lora_expand_ref, lora_shrink_ref, make_lora_meta


def test_meta_groups_tokens_by_slot_with_unused_segments_marked():
    slots = torch.tensor([2, -1, 0, 2, 2, -1, 0], dtype=torch.int32)
    meta = make_lora_meta(slots, max_segments=4)
    assert meta.num_segments == 2
    assert meta.seg_slots.tolist() == [0, 2, -1, -1]
    assert meta.seg_starts.tolist()[:2] == [0, 2]
    assert meta.seg_lens.tolist() == [2, 3, 0, 0]
    assert meta.sorted_token_ids.tolist() == [2, 6, 0, 3, 4, 1, 5]
    assert meta.sorted_token_ids.dtype == torch.int32 and meta.seg_slots.dtype == torch.int32


@pytest.mark.parametrize("slots", [[], [-1, -1], [0], [3, 3, 3]])
def test_meta_edge_cases(slots):
    meta = make_lora_meta(torch.tensor(slots, dtype=torch.int32), max_segments=4)
    used = [s for s in slots if s >= 0]
    assert meta.num_segments == len(set(used))
    assert int(meta.seg_lens.sum()) == len(used)
    assert meta.seg_slots.shape == (4,)


@pytest.mark.parametrize("bad", [[4], [-2], [0, 7]])
def test_meta_rejects_out_of_range_slots(bad):
    with pytest.raises(ValueError):
        make_lora_meta(torch.tensor(bad, dtype=torch.int32), max_segments=4)


def _per_token_lora(x, a_list, b_list, slots, scales, ranks):
    """Straight from the definition: one token at a time, float64."""
    outs = []
    for t in range(x.shape[0]):
        s = int(slots[t])
        row = []
        for a, b in zip(a_list, b_list, strict=True):
            if s < 0:
                row.append(torch.zeros(b.shape[1], dtype=torch.float64))
                continue
            r = int(ranks[s])
            h = x[t].double() @ a[s, :r].double().T
            row.append(float(scales[s]) * (h @ b[s, :, :r].double().T))
        outs.append(torch.cat(row))
    return torch.stack(outs)


def test_shrink_expand_refs_match_per_token_definition():
    num_tokens, hidden, rank, num_slots = 9, 12, 4, 3
    widths = [12, 6, 6]
    x = torch.randn(num_tokens, hidden)
    a_list = [torch.randn(num_slots, rank, hidden) for _ in widths]
    b_list = [torch.randn(num_slots, w, rank) for w in widths]
    slots = torch.tensor([0, 2, -1, 0, 1, 1, 2, -1, 0], dtype=torch.int32)
    scales = torch.rand(num_slots) + 0.5
    ranks = torch.tensor([4, 2, 3], dtype=torch.int32)
    meta = make_lora_meta(slots, max_segments=num_slots)
    buf = torch.full((len(widths), num_tokens, rank), float("nan"))
    lora_shrink_ref(x, a_list, meta, buf, ranks)
    y0 = torch.randn(num_tokens, sum(widths))
    y = y0.clone()
    lora_expand_ref(buf, b_list, meta, y, scales, ranks)
    want = y0.double() + _per_token_lora(x, a_list, b_list, slots, scales, ranks)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.all(buf[:, slots == -1] == 0)


def test_write_kv_ref_places_tokens_and_skips_minus_one():
    k_cache = torch.zeros(3, 4, 2, 5)
    v_cache = torch.zeros(3, 4, 2, 5)
    k, v = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    write_kv_ref(k, v, k_cache, v_cache, torch.tensor([5, -1, 11]))
    assert torch.equal(k_cache[1, 1], k[0]) and torch.equal(v_cache[2, 3], v[2])
    assert int((k_cache != 0).any(dim=(2, 3)).sum()) == 2


def test_paged_attention_ref_matches_dense_causal_attention():
    # One sequence of 7 tokens, 3 cached + 4 new, stored in scrambled blocks of size 2.
    hq, hkv, d, bs = 4, 2, 8, 2
    ctx, n_new = 7, 4
    keys, values = torch.randn(ctx, hkv, d), torch.randn(ctx, hkv, d)
    q = torch.randn(n_new, hq, d)
    table = torch.tensor([[5, 0, 3, 1]], dtype=torch.int32)
    k_cache, v_cache = torch.randn(6, bs, hkv, d), torch.randn(6, bs, hkv, d)
    slots = table[0].to(torch.int64)[torch.arange(ctx) // bs] * bs + torch.arange(ctx) % bs
    write_kv_ref(keys, values, k_cache, v_cache, slots)
    out = paged_attention_ref(
        q, k_cache, v_cache, table, torch.tensor([ctx]), torch.tensor([0, n_new]), scale=0.3
    )
    kk = keys.repeat_interleave(2, dim=1).transpose(0, 1)  # [Hq, ctx, D]
    vv = values.repeat_interleave(2, dim=1).transpose(0, 1)
    mask = torch.ones(n_new, ctx, dtype=torch.bool).tril(diagonal=ctx - n_new)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk, vv, attn_mask=mask, scale=0.3
    ).transpose(0, 1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
