"""Logits -> next tokens (+ top-n logprobs), on the logits' device.

Order: the grammar mask of constrained rows (structured outputs: the bitmask filled on the host first,
while the device may still run the forward), logit_bias, penalties, min_tokens masking, temperature,
top-k / top-p / min-p, then argmax (greedy) or an exponential race (random). Seeded requests draw from
their own torch.Generator, so a seed gives the same text whatever else shares the batch; unseeded ones
share the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from engine.request import Request
from engine.structured import MaskFiller, apply_bitmask

_PLAIN_GREEDY = attrgetter("plain_greedy")


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # Per row: {token_id: logprob} (top-n plus the sampled token), or None when not asked for.
    logprobs: list[dict[int, float] | None]


def all_plain_greedy(requests: list[Request]) -> bool:
    return all(map(_PLAIN_GREEDY, requests))


def greedy_tokens(logits: Tensor) -> Tensor:
    """[B] int64 argmax of each row, left on the logits' device."""
    return logits.float().argmax(dim=-1)


def can_sample_ahead(requests: list[Request]) -> bool:
    """Whether Sampler.sample_tensor covers these rows: nothing in them depends on the tokens sampled so
    far on the device (penalties and min_tokens do) and nothing is read back (logprobs). A grammar row
    qualifies: its mask comes from the host, once the tokens before are accepted (engine/async_scheduling.py
    samples such a step after reading them)."""
    return all(
        r.plain_greedy or (not r.has_penalties and not r.params.min_tokens and r.params.logprobs is None)
        for r in requests
    )


def to_device(device: torch.device, values: list[Any], dtype: torch.dtype | None = None) -> Tensor:
    """A small tensor of host values on `device`, without waiting for the device: a plain copy from
    pageable memory waits for everything queued on the stream, which would end async scheduling's
    overlap. Pinned memory copies asynchronously (torch keeps the buffer until the copy is done)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        # Fills constrained rows' bitmasks (llguidance's thread pool); made for the first such row.
        self.masks: MaskFiller | None = None

    @torch.inference_mode()
    def __call__(self, logits: Tensor, requests: list[Request]) -> SamplerOutput:
        """logits [B, V] float32, one row per request (in order)."""
        assert logits.dim() == 2 and logits.shape[0] == len(requests), (tuple(logits.shape), len(requests))
        if all_plain_greedy(requests):
            # The common batch: argmax is all there is to do, so no copy and no per-row Python work.
            return SamplerOutput(greedy_tokens(logits).tolist(), [None] * len(requests))
        masks = self._grammar_masks(requests, logits.shape[1])  # host work first: the device may still run
        logits = logits.to(torch.float32, copy=True)
        if masks is not None:
            apply_bitmask(logits, *masks)
        _apply_logit_bias(logits, requests)
        self._apply_penalties(logits, requests)
        self._apply_min_tokens(logits, requests)
        token_ids = self._choose(logits, requests).tolist()
        return SamplerOutput(token_ids, self._logprobs(logits, requests, token_ids))

    @torch.inference_mode()
    def sample_tensor(self, logits: Tensor, requests: list[Request]) -> Tensor:
        """[B] int64 tokens left on the device, nothing read back and no wait for the device (async
        scheduling). Only for rows `can_sample_ahead` accepts; draws as __call__ does."""
        if all_plain_greedy(requests):
            return greedy_tokens(logits)
        assert can_sample_ahead(requests)
        masks = self._grammar_masks(requests, logits.shape[1])
        logits = logits.to(torch.float32, copy=True)
        if masks is not None:
            apply_bitmask(logits, *masks)
        _apply_logit_bias(logits, requests)
        return self._choose(logits, requests)

    def _grammar_masks(self, requests: list[Request], vocab: int) -> tuple[list[int], Tensor] | None:
        """The constrained rows and their bitmasks (device), or None when no row has a grammar. A request
        that finished meanwhile (a step ahead samples its row, then drops the token) is left unmasked."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None and not r.is_finished]
        if not rows:
            return None
        if self.masks is None:
            self.masks = MaskFiller(vocab, self.device)
        return rows, self.masks.fill([requests[i].grammar for i in rows])

    def _choose(self, logits: Tensor, requests: list[Request]) -> Tensor:
        """Temperature, top-k / top-p / min-p, then argmax or a draw per row: tokens [B] on the device.
        logits [B, V] float32, changed in place."""
        greedy = [r.greedy for r in requests]
        if not all(greedy):
            temps = [1.0 if g else r.params.temperature for r, g in zip(requests, greedy, strict=True)]
            logits.div_(to_device(logits.device, temps).unsqueeze(1))
            _apply_top_k_top_p_min_p(
                logits, [r for r, g in zip(requests, greedy, strict=True) if not g], greedy
            )
        tokens = logits.argmax(dim=-1)  # [B]
        sampled_rows = [i for i, g in enumerate(greedy) if not g]
        if sampled_rows:
            rows = to_device(logits.device, sampled_rows, torch.int64)
            tokens[rows] = self._draw(logits[rows], [requests[i] for i in sampled_rows])
        return tokens

    # ---- steps ----
    def _apply_penalties(self, logits: Tensor, requests: list[Request]) -> None:
        vocab = logits.shape[1]
        for row, request in enumerate(requests):
            if not request.has_penalties:
                continue
            p = request.params
            output = torch.tensor(request.output_token_ids, dtype=torch.int64, device=logits.device)
            counts = torch.bincount(output, minlength=vocab)[:vocab].to(torch.float32)
            if p.repetition_penalty != 1.0:
                # HF semantics: every token seen in prompt or output is pushed towards "less likely".
                seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                prompt = torch.tensor(request.prompt_token_ids, dtype=torch.int64, device=logits.device)
                seen[prompt[prompt < vocab]] = True
                seen |= counts > 0
                row_logits = logits[row]
                penalized = torch.where(
                    row_logits > 0, row_logits / p.repetition_penalty, row_logits * p.repetition_penalty
                )
                logits[row] = torch.where(seen, penalized, row_logits)
            if p.frequency_penalty != 0.0:
                logits[row] -= p.frequency_penalty * counts
            if p.presence_penalty != 0.0:
                logits[row] -= p.presence_penalty * (counts > 0).to(torch.float32)

    def _apply_min_tokens(self, logits: Tensor, requests: list[Request]) -> None:
        vocab = logits.shape[1]
        for row, request in enumerate(requests):
            if not request.params.min_tokens or request.num_output_tokens >= request.params.min_tokens:
                continue
            if request.grammar is not None:
                continue  # the end of the grammar wins: banning EOS there would leave no token at all
            banned = set(request.params.stop_token_ids)
            if not request.params.ignore_eos:
                banned.update(request.eos_token_ids)
            ids = [t for t in banned if t < vocab]
            if ids:
                logits[row, ids] = float("-inf")

    def _draw(self, logits: Tensor, requests: list[Request]) -> Tensor:
        """One categorical draw per row: argmax(p / q) with q ~ Exp(1) picks token i with probability p_i.
        logits [Bs, V]. Seeded rows draw q from their own generator, the rest in one call from the shared one."""
        probs = torch.softmax(logits, dim=-1)  # [Bs, V]
        q = torch.empty_like(probs)
        shared = [j for j, r in enumerate(requests) if r.params.seed is None]
        if shared:
            rows = to_device(logits.device, shared, torch.int64)
            q[rows] = torch.empty(len(shared), q.shape[1], device=q.device).exponential_(
                generator=self.generator
            )
        for j, request in enumerate(requests):
            if request.params.seed is None:
                continue
            q[j].exponential_(generator=request_generator(request, logits.device))
        return (probs / q.clamp_min_(1e-20)).argmax(dim=-1)

    def _logprobs(
        self, logits: Tensor, requests: list[Request], token_ids: list[int]
    ) -> list[dict[int, float] | None]:
        wanted = [r.params.logprobs for r in requests]
        if all(w is None for w in wanted):
            return [None] * len(requests)
        logprobs = torch.log_softmax(logits, dim=-1)
        most = min(max(w or 0 for w in wanted), logits.shape[1])
        top_vals, top_ids = logprobs.topk(most, dim=-1) if most else (None, None)
        chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device).unsqueeze(1)).squeeze(1)
        chosen_list = chosen.tolist()
        # Two device -> host copies for the whole batch, not two per row.
        ids_rows = top_ids.tolist() if top_ids is not None else None
        vals_rows = top_vals.tolist() if top_vals is not None else None
        out: list[dict[int, float] | None] = [None] * len(requests)
        for row, n in enumerate(wanted):
            if n is None:
                continue
            entry = {token_ids[row]: chosen_list[row]}
            if n and ids_rows is not None and vals_rows is not None:
                for tid, val in zip(ids_rows[row][:n], vals_rows[row][:n], strict=True):
                    entry.setdefault(tid, val)
            out[row] = entry
        return out


def request_generator(request: Request, device: torch.device) -> torch.Generator:
    """A seeded request's own generator, made on its first draw."""
    if request.generator is None:
        assert request.params.seed is not None
        request.generator = torch.Generator(device=device)
        # Any Python int is a valid seed; torch takes [0, 2**64).
        request.generator.manual_seed(request.params.seed % (1 << 64))
    return request.generator  # type: ignore[no-any-return]


def skip_draws(generator: torch.Generator, rows: int, vocab: int, device: torch.device) -> None:
    """Advance a seeded request's generator past `rows` draws of Sampler._draw (one [V] row each), e.g.
    after speculative decoding rewound it to before the rows it drew but did not emit."""
    row = torch.empty(vocab, dtype=torch.float32, device=device)
    for _ in range(rows):
        row.exponential_(generator=generator)


def _apply_logit_bias(logits: Tensor, requests: list[Request]) -> None:
    """Add each row's logit_bias to its logits, in place: one scatter for the whole batch."""
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for row, request in enumerate(requests):
        for token_id, bias in (request.params.logit_bias or {}).items():
            rows.append(row)
            ids.append(token_id)
            values.append(float(bias))
    if not rows:
        return
    device = logits.device
    flat = to_device(device, [r * logits.shape[1] + t for r, t in zip(rows, ids, strict=True)], torch.int64)
    logits.view(-1).index_add_(0, flat, to_device(device, values, torch.float32))


def _apply_top_k_top_p_min_p(logits: Tensor, sampled: list[Request], greedy: list[bool]) -> None:
    """Mask (to -inf) what top-k, top-p and min-p exclude, on the rows that sample (greedy rows untouched)."""
    if not any(r.params.top_k or r.params.top_p < 1.0 or r.params.min_p > 0.0 for r in sampled):
        return
    vocab = logits.shape[1]
    device = logits.device
    rows = to_device(device, [i for i, g in enumerate(greedy) if not g], torch.int64)
    sub = logits.index_select(0, rows)  # [Bs, V]
    top_k = to_device(device, [r.params.top_k or vocab for r in sampled], torch.int64).clamp_(max=vocab)
    top_p = to_device(device, [r.params.top_p for r in sampled], torch.float32)
    min_p = to_device(device, [r.params.min_p for r in sampled], torch.float32)
    sorted_logits, order = sub.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    drop = ranks >= top_k.unsqueeze(1)
    full = torch.softmax(sorted_logits, dim=-1)
    # min-p: tokens less likely than min_p times the most likely one.
    drop |= full < min_p.unsqueeze(1) * full[:, :1]
    probs = torch.softmax(sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf")), dim=-1)
    # top-p over what top-k kept: the smallest prefix whose mass reaches top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False  # the most likely token always survives
    sub.scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    logits.index_copy_(0, rows, sub)
