"""One speculative step: propose drafts, run the target over them, keep what the target itself samples.

Verification is the sampler's own work, row by row: a sequence with k drafts gets k + 1 logits rows (the
target's distribution after each prefix), the sampler draws one token per row exactly as it would without
speculation (greedy: argmax; random: the exponential race, a seeded request drawing from its own
generator), and the drafts are accepted while they equal those tokens; the first differing target token
(or the bonus token after k accepted drafts) ends the run. So every emitted token is a sample from the
target given the tokens before it: greedy outputs equal non-speculative ones, and random ones keep the
target's distribution. For a draft that is a single token (every proposer here drafts deterministically),
this is Leviathan et al.'s rule: the draft d is accepted with probability p(d), and a rejection samples p
without d, renormalized. A seeded request's generator is moved back to just after the rows it used, so
its text equals the non-speculative one too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from engine.request import Request
from engine.sampler import Sampler, SamplerOutput, request_generator, skip_draws, to_device
from engine.spec.config import SpeculativeConfig
from engine.spec.proposer import NgramProposer, Proposer
from engine.spec.stats import SpecStats
from engine.spec.switch import SpecSwitch

log = logging.getLogger(__name__)

Batch = list[tuple[Request, int]]
# (request, its first logits row, its number of rows): k + 1 for a verifying sequence, 1 for the others.
Owner = tuple[Request, int, int]
# What one sequence emits in a step: tokens and their logprobs entries (None when not asked for).
Run = tuple[list[int], list[dict[int, float] | None]]


class SpecDecoder:
    def __init__(
        self, config: SpeculativeConfig, max_model_len: int, proposer: Proposer | None = None
    ) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.max_model_len = max_model_len
        self.proposer: Proposer = proposer or NgramProposer(
            config.prompt_lookup_min, config.prompt_lookup_max
        )
        self.switch = SpecSwitch(config)
        self.stats = SpecStats()
        # Drafts the proposer made this step, by request id (pad fillers are not drafts: never counted).
        self.proposed: dict[str, int] = {}
        # Fill drafts up to k for uniform verify steps (the engine sets it when the runner has CUDA graphs).
        self.pad = False

    # ---- before the schedule ----
    def propose(self, running: list[Request]) -> None:
        """Draft for every running sequence that decodes and can be verified row by row. The proposer is
        asked for at most what a fully accepted run can emit before max_tokens; with `pad`, every such
        sequence's drafts are then filled up to k (the last token repeated), so that the verify step is
        uniform (k + 1 tokens per row) and replays a CUDA graph instead of running eager."""
        for request in running:
            if request.spec_token_ids:
                request.spec_token_ids = []
        self.proposed = {}
        self.proposer.retain(running)
        if not self.switch.on(len(running)):
            self.switch.tick()
            return
        picked: list[Request] = []
        lens: list[int] = []
        for r in running:
            if not r.can_speculate or r.num_computed_tokens != len(r.all_token_ids) - 1:
                continue
            left = (r.params.max_tokens or 0) - r.num_output_tokens - 1  # the bonus token is one more
            k = min(self.k, left, self.max_model_len - len(r.all_token_ids))
            if k > 0:
                picked.append(r)
                lens.append(k)
        if not picked:
            return
        # Probing: the longest-running few only (a draft model keeps their KV between probes).
        limit = self.switch.probe_limit()
        if limit is not None:
            picked, lens = picked[:limit], lens[:limit]
        try:
            proposals = self.proposer.propose(picked, lens)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            # Drafts are only guesses: a proposer that fails on some data costs this step its drafts,
            # never a request. Runtime (device) errors go on to the step guard, which judges the engine.
            log.warning("speculative proposer failed; this step decodes without drafts", exc_info=exc)
            return
        found = False
        for request, k, drafts in zip(picked, lens, proposals, strict=True):
            request.spec_token_ids = list(drafts[:k])
            self.proposed[request.request_id] = len(request.spec_token_ids)
            found = found or bool(drafts)
        if not found:
            # Nothing to verify costs no wide step, but speculating keeps steps from going ahead of the
            # host (async scheduling): the switch counts it as a step that accepted nothing.
            self.switch.record(len(picked), 0)
            for request in picked:
                request.spec_token_ids = []
            return
        if self.pad:
            for request in running:
                if not request.can_speculate or request.num_computed_tokens != len(request.all_token_ids) - 1:
                    continue
                width = min(self.k, self.max_model_len - len(request.all_token_ids))
                drafts = request.spec_token_ids
                filler = drafts[-1] if drafts else request.all_token_ids[-1]
                drafts.extend([filler] * (width - len(drafts)))
                self.proposed.setdefault(request.request_id, 0)  # fillers only: no drafts of its own

    def allows_ahead(self, num_running: int, launching: bool) -> bool:
        """Async scheduling asks before a step goes ahead of the host: only while speculation is off (a
        proposer needs the latest tokens on the host). launching: a step made without schedule(), which
        counts as one paused step."""
        if self.switch.on(num_running):
            return False
        if launching:
            self.switch.tick()
        return True

    # ---- the step ----
    @staticmethod
    def has_drafts(batch: Batch) -> bool:
        return any(r.spec_token_ids for r, _ in batch)

    @staticmethod
    def drop_drafts(batch: Batch) -> Batch:
        """The batch with every sequence decoding one token (e.g. a step that collects prompt logprobs)."""
        out = []
        for r, n in batch:
            if r.spec_token_ids:
                n, r.spec_token_ids = 1, []
            out.append((r, n))
        return out

    def forward(self, runner: Any, batch: Batch) -> tuple[Tensor, list[Owner]]:
        """Run the target: logits [R, V] of every verifying row and of the last token of every other
        sequence that samples this step, and who owns which rows. Call before the scheduler advances."""
        owners: list[Owner] = []
        rows: list[int] = []
        offset = 0
        for r, n in batch:
            if r.spec_token_ids:
                owners.append((r, len(rows), n))
                rows.extend(range(offset, offset + n))
            elif r.num_computed_tokens + n == len(r.all_token_ids):
                owners.append((r, len(rows), 1))
                rows.append(offset + n - 1)
            offset += n
        verifying = [r for r, _ in batch if r.spec_token_ids]
        for r in verifying:  # the step input reads a row's query tokens from all_token_ids
            r.all_token_ids.extend(r.spec_token_ids)
        try:
            if max(n for _, n in batch) > 1 + self.k:
                # A prefill chunk in the step: logits for every token would be [sum n, V]; take the rows.
                hidden = runner.execute_hidden(batch)  # [sum n, H]
                logits = runner.logits(hidden.index_select(0, to_device(hidden.device, rows, torch.int64)))
            else:
                logits = runner.execute(batch, all_logits=True)  # [sum n, V]
                if len(rows) != offset:
                    logits = logits.index_select(0, to_device(logits.device, rows, torch.int64))
        finally:
            for r in verifying:
                del r.all_token_ids[len(r.all_token_ids) - len(r.spec_token_ids) :]
        return logits, owners

    def verify(self, sampler: Sampler, logits: Tensor, owners: list[Owner]) -> list[Run]:
        """Sample every row, accept each verifying sequence's matching drafts, roll back the rest: the
        scheduler counted all k + 1 query tokens computed, the sequence keeps 1 + accepted (its rejected
        drafts' KV lies past that and is overwritten later, never read: attention stops at the length)."""
        expanded = [r for r, _, count in owners for _ in range(count)]
        vocab = logits.shape[1]
        states = {}
        for r, _, count in owners:
            if count > 1 and not r.greedy and r.params.seed is not None:
                states[id(r)] = request_generator(r, logits.device).get_state()
        sampled: SamplerOutput = sampler(logits, expanded)
        runs: list[Run] = []
        drafted = accepted = 0
        for r, first, count in owners:
            tokens = sampled.token_ids[first : first + count]
            logprobs = sampled.logprobs[first : first + count]
            drafts = r.spec_token_ids
            if not drafts:
                runs.append((tokens, logprobs))
                continue
            a = 0
            while a < len(drafts) and drafts[a] == tokens[a]:
                a += 1
            r.num_computed_tokens -= len(drafts) - a  # back to the last accepted draft
            r.spec_token_ids = []
            real = min(self.proposed.get(r.request_id, len(drafts)), len(drafts))  # without pad fillers
            if real:
                self.stats.record(real, min(a, real))
            drafted += real
            accepted += min(a, real)
            state = states.get(id(r))
            if state is not None:  # as if it had drawn only for the tokens it emits
                generator = r.generator
                generator.set_state(state)
                skip_draws(generator, a + 1, vocab, logits.device)
            runs.append((tokens[: a + 1], logprobs[: a + 1]))
        self.switch.record(drafted, accepted)
        return runs
