"""Prompt lookup (n-gram) drafts: find the sequence's last n tokens earlier in its own tokens (prompt and
output) and propose what followed them there. No model, no torch."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k drafted tokens: after the most recent earlier occurrence of the longest suffix of length
    in [min_n, max_n] (longest first). A continuation that runs into the suffix itself goes on through the
    drafts (a repeating loop of period p < k still yields k tokens). [] when nothing matches."""
    length = len(tokens)
    if length < min_n + 1 or k <= 0:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = arr[length - n :]
        # Windows starting at 0 .. length - n - 1: every earlier occurrence (the suffix itself excluded).
        windows = sliding_window_view(arr[: length - 1], n)  # [length - n, n]
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size == 0:
            continue
        start = int(hits[-1]) + n  # most recent occurrence: loops repeat their latest period
        out: list[int] = []
        for j in range(k):
            i = start + j
            out.append(tokens[i] if i < length else out[i - length])
        return out
    return []
