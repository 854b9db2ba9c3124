"""Prompt logprobs (vLLM's `prompt_logprobs`): the log-probability of every prompt token given the tokens
before it, with the top-k alternatives and the prompt token's rank.

A step that computes part of the prompt of a request collecting them runs its forward eagerly for the
final hidden states of every token (ModelRunner.execute_hidden); the rows of those requests become
logits a slice at a time (ModelRunner.logits), get log-softmax, the prompt token's logprob and rank, and
the top-k on the device, and only those small results are copied to the host: the device holds at most
ROWS_PER_SLICE x vocab logits at once, whatever the chunk's length. The rows are gathered across
chunked-prefill steps in the request's `prompt_logprobs` list (a position already there, e.g. after a
preemption's recompute, is skipped). The step then samples from each request's last row's logits, as a
step without prompt logprobs would.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from engine.request import Logprob, Request
from engine.sampler import to_device

# Rows whose log-softmax is held at once: bounds the extra device memory to ROWS x vocab floats.
ROWS_PER_SLICE = 256


def wants_prompt_logprobs(scheduled: list[tuple[Request, int]]) -> bool:
    """Whether a request of this step computes prompt tokens whose logprobs it still lacks."""
    return any(_positions(request, n) for request, n in scheduled)


def _positions(request: Request, n: int) -> range:
    """Prompt positions whose logprobs this chunk gives and the request still lacks. Row i of the chunk
    holds the logits after position start + i, i.e. those of the token at start + i + 1."""
    collected = request.prompt_logprobs
    if collected is None:
        return range(0)
    start = request.num_computed_tokens
    return range(max(len(collected), start + 1), min(start + n + 1, len(request.prompt_token_ids)))


@torch.inference_mode()
def collect_prompt_logprobs(runner: Any, scheduled: list[tuple[Request, int]]) -> Tensor:
    """Runs the step (runner: ModelRunner's execute_hidden and logits), records the prompt logprobs of the
    rows that give them, and returns each request's last row's logits [B, V], which the step samples from."""
    hidden = runner.execute_hidden(scheduled)  # [sum n, H]
    rows: list[int] = []
    targets: list[int] = []  # the prompt token each row predicts
    owners: list[tuple[Request, int]] = []  # (request, top-k) per row
    last: list[int] = []
    offset = 0
    for request, n in scheduled:
        start = request.num_computed_tokens
        for position in _positions(request, n):
            rows.append(offset + position - start - 1)
            targets.append(request.prompt_token_ids[position])
            owners.append((request, request.params.prompt_logprobs or 0))
        offset += n
        last.append(offset - 1)
    device = hidden.device
    for begin in range(0, len(rows), ROWS_PER_SLICE):
        end = begin + ROWS_PER_SLICE
        picked = hidden.index_select(0, to_device(device, rows[begin:end], torch.int64))
        _record(runner.logits(picked), targets[begin:end], owners[begin:end])
    return runner.logits(hidden.index_select(0, to_device(device, last, torch.int64)))  # type: ignore[no-any-return]


def _record(logits: Tensor, targets: list[int], owners: list[tuple[Request, int]]) -> None:
    """logits [R, V] float32 of the rows predicting `targets`."""
    device = logits.device
    lp = torch.log_softmax(logits, dim=-1)
    target = to_device(device, targets, torch.int64).unsqueeze(1)  # [R, 1]
    chosen = lp.gather(1, target)  # [R, 1]
    rank = (lp > chosen).sum(dim=1) + 1  # [R]
    k = min(max(top for _, top in owners), lp.shape[1])
    top_vals, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], target[:, :0])
    # Four small copies for the slice, not four per row.
    chosen_l, rank_l = chosen.squeeze(1).tolist(), rank.tolist()
    vals_l, ids_l = top_vals.tolist(), top_ids.tolist()
    for i, (request, top) in enumerate(owners):
        entry = {targets[i]: Logprob(chosen_l[i], rank_l[i])}
        for r, (tid, val) in enumerate(zip(ids_l[i][:top], vals_l[i][:top], strict=True)):
            entry.setdefault(tid, Logprob(val, r + 1))
        assert request.prompt_logprobs is not None
        request.prompt_logprobs.append(entry)
