"""Sliding-window and soft-capped paged attention: the Triton kernel against the torch reference (on CPU
in Triton's interpreter, fp32), and the reference against a dense masked attention written here."""

from __future__ import annotations

import pytest
import torch

from kernels.attention import paged_attention, paged_attention_ref
from tests.kernels.test_attention import make_batch
from tests.kernels.test_lora import REL_TOL, rel_err

CASES = {
    # q lens, context lens (context includes the queries)
    "prefill": ([13, 20], [13, 20]),
    "decode": ([1, 1, 1], [3, 17, 41]),
    "chunk_on_a_cached_prefix": ([5, 1, 7], [19, 30, 26]),  # chunked prefill / prefix hit: queries at the end
}


@pytest.mark.parametrize("window", [1, 4, 7, 64])
@pytest.mark.parametrize("case", list(CASES))
def test_window_kernel_matches_reference(case, window, device):
    q_lens, ctx_lens = CASES[case]
    q, kc, vc, tables, seq_lens, starts = make_batch(q_lens, ctx_lens, 4, 2, 16, 4, torch.float32, device)
    out = paged_attention(q, kc, vc, tables, seq_lens, starts, 0.25, window=window, block_n=16)
    want = paged_attention_ref(q, kc, vc, tables, seq_lens, starts, 0.25, window=window)
    assert rel_err(out, want) < REL_TOL[torch.float32]
    if window < max(ctx_lens):  # positive control: the window changes the answer
        full = paged_attention_ref(q, kc, vc, tables, seq_lens, starts, 0.25)
        assert rel_err(full, want) > 1e-3


@pytest.mark.parametrize("num_splits", [2, 3])
def test_window_with_split_context(num_splits, device):
    q, kc, vc, tables, seq_lens, starts = make_batch(
        [1, 4, 1], [50, 37, 9], 4, 1, 16, 8, torch.float32, device
    )
    kw = {"window": 11}
    out = paged_attention(q, kc, vc, tables, seq_lens, starts, 0.3, num_splits=num_splits, block_n=16, **kw)
    want = paged_attention_ref(q, kc, vc, tables, seq_lens, starts, 0.3, **kw)
    assert rel_err(out, want) < REL_TOL[torch.float32]


@pytest.mark.parametrize("window", [0, 6])
def test_softcap_kernel_matches_reference(window, device):
    q, kc, vc, tables, seq_lens, starts = make_batch([3, 1], [12, 21], 4, 2, 16, 4, torch.float32, device)
    q = q * 8  # large scores, so the cap bites
    kw = {"window": window, "softcap": 5.0}
    out = paged_attention(q, kc, vc, tables, seq_lens, starts, 0.25, block_n=16, **kw)
    want = paged_attention_ref(q, kc, vc, tables, seq_lens, starts, 0.25, **kw)
    assert rel_err(out, want) < REL_TOL[torch.float32]
    uncapped = paged_attention_ref(q, kc, vc, tables, seq_lens, starts, 0.25, window=window)
    assert rel_err(uncapped, want) > 1e-3


def test_reference_equals_dense_masked_attention():
    """One sequence, one head: softmax over keys p - w < j <= p of cap * tanh(scale * q.k / cap)."""
    n, d, window, cap, scale = 15, 8, 5, 3.0, 0.4
    q, kc, vc, tables, seq_lens, starts = make_batch([n], [n], 1, 1, d, 4, torch.float32, "cpu")
    pos = torch.arange(n)
    blocks = tables[0].to(torch.int64)[pos // 4]
    keys, values = kc[blocks, pos % 4, 0], vc[blocks, pos % 4, 0]  # [n, d]
    scores = cap * torch.tanh(scale * q[:, 0] @ keys.T / cap)
    visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    want = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ values
    got = paged_attention_ref(q, kc, vc, tables, seq_lens, starts, scale, window=window, softcap=cap)
    torch.testing.assert_close(got[:, 0], want)
