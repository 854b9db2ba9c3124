"""Async scheduling: the host schedules and launches step N + 1 before it reads step N's sampled tokens.

One concept: a step *in flight*, whose sampled tokens are still on the device (`InFlight`). While one is
in flight, the engine's next step (`AsyncScheduling.advance`):
  1. schedules the decode step after it (Scheduler.schedule_ahead: every running request that is not
     certain to stop by length, and only when that is the step schedule() would make), and launches it
     with the in-flight tokens as its input ids, still on the device;
  2. then reads the in-flight tokens (the step's only wait for the device) for the host's work
     (detokenize, stop checks, outputs), which overlaps the step just launched;
  3. `settle`: the requests that go on count the launched token as computed (Scheduler.advance_ahead)
     and the launched step becomes the one in flight.
A request that stops on the token just read (EOS, stop string, abort) computed one token too many in the
launched step: that token is dropped. Its KV write landed in its own blocks, before any later step can
reuse them (one device stream), so the results equal those of synchronous steps.

A step goes in flight only when no row needs its tokens so far on the device to sample
(Sampler.sample_tensor's rows) and every scheduled request samples in it; anything else (a waiting
request, a chunked prefill, blocks short) falls back to a synchronous schedule() step, after which the
chain can start again.

Structured outputs: a constrained row's mask depends on every token before, which the host accepts into
the row's grammar only after reading them. So a step launched ahead with a constrained row is sampled in
`settle`, after the host's work on the tokens read: its forward runs on the device while the host
accepts the tokens and fills the next masks, and the sampling follows (`Launched.logits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.request import Request
from engine.sampler import Sampler, SamplerOutput, can_sample_ahead, to_device
from engine.scheduler import Scheduler


@dataclass(slots=True)
class Launched:
    """A step launched ahead whose rows cannot be sampled yet (a grammar row: its mask needs the tokens
    being read). `settle` samples it."""

    requests: list[Request]
    logits: Any  # [B, V] on the device


@dataclass(slots=True)
class InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    requests: list[Request]
    tokens: Any  # [B] int64 Tensor on the device, one row per request
    host: Any = field(init=False, default=None)  # its copy in pinned host memory, on its way (CUDA)
    copied: Any = field(init=False, default=None)  # CUDA event: the copy is done

    def __post_init__(self) -> None:
        # The copy starts now, before the next step is queued behind it: a plain .tolist() later would
        # queue its copy after the next step and wait for that one too.
        if self.tokens.is_cuda:
            self.host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self.host.copy_(self.tokens, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.host = self.tokens

    def token_ids(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()  # type: ignore[no-any-return]


class AsyncScheduling:
    def __init__(
        self, enabled: bool, scheduler: Scheduler, runner: Any, sampler: Sampler, max_model_len: int
    ) -> None:
        """runner: anything with ModelRunner.execute's signature."""
        self.enabled = enabled
        self.scheduler, self.runner, self.sampler = scheduler, runner, sampler
        self.max_model_len = max_model_len
        self.in_flight: InFlight | None = None
        self._launched: InFlight | Launched | None = None  # launched by advance(), in flight after settle()
        self.num_steps_ahead = 0  # steps launched before the previous one's tokens were read
        # Speculative decoding (engine/spec/decoder.py's SpecDecoder), None when off: steps go ahead only
        # while it is switched off, since a proposer needs the latest tokens on the host.
        self.spec: Any = None

    def start(self, ready: list[Request], num_scheduled: int, logits: Any) -> bool:
        """After a synchronous step's forward: sample on the device and put the step in flight, when
        every scheduled request samples in it and no row needs the host (False: sample synchronously)."""
        if not self.enabled or len(ready) != num_scheduled or not can_sample_ahead(ready):
            return False
        if self.spec is not None and not self.spec.allows_ahead(self.scheduler.num_running, launching=False):
            return False
        self.in_flight = InFlight(ready, self.sampler.sample_tensor(logits, ready))
        return True

    def advance(self) -> tuple[list[Request], SamplerOutput]:
        """Launch the step after the one in flight (when it can go ahead), then read the in-flight
        tokens. Returns the rows to postprocess (requests aborted meanwhile left out) and their tokens."""
        current, self.in_flight = self.in_flight, None
        assert current is not None
        rows = [i for i, r in enumerate(current.requests) if not r.is_finished]  # aborts between steps
        live = [current.requests[i] for i in rows]
        self._launched = self._launch(live, current.tokens, rows)
        token_ids = current.token_ids()  # the step's only wait for the device
        return live, SamplerOutput([token_ids[i] for i in rows], [None] * len(live))

    def settle(self) -> None:
        """After the host's work on the tokens read: the launched step goes in flight for the requests
        that go on. The rows of requests that just stopped stay in it: the next advance skips them."""
        launched, self._launched = self._launched, None
        if launched is None:
            return
        going = [r for r in launched.requests if not r.is_finished]
        self.scheduler.advance_ahead(going)
        if not going:
            self.in_flight = None
        elif isinstance(launched, Launched):
            # The grammars have the tokens just read now: fill the masks (while the forward may still run
            # on the device) and sample. Rows of requests that just stopped are sampled unmasked and dropped.
            self.in_flight = InFlight(
                launched.requests, self.sampler.sample_tensor(launched.logits, launched.requests)
            )
        else:
            self.in_flight = launched

    def drop(self) -> None:
        """Forget the steps in flight (a step raised: StepGuard preempts their requests, which recompute)."""
        self.in_flight = self._launched = None

    def _launch(self, live: list[Request], tokens: Any, rows: list[int]) -> InFlight | Launched | None:
        if not live or len(live) != self.scheduler.num_running:
            return None  # e.g. a request in chunked prefill is running too: schedule() decides
        if self.spec is not None and not self.spec.allows_ahead(len(live), launching=True):
            return None  # speculation is on again: the next step proposes, on the host
        keep = [j for j, r in enumerate(live) if not self._stops_by_length(r)]
        scheduled = self.scheduler.schedule_ahead([live[j] for j in keep])
        if scheduled is None:
            return None
        picked = [rows[j] for j in keep]
        if len(picked) == tokens.shape[0]:
            ids = tokens
        else:  # a request stopped or was aborted: gather the others' rows (index through pinned memory)
            ids = tokens.index_select(0, to_device(tokens.device, picked, torch.int64))
        logits = self.runner.execute(scheduled, input_ids=ids)
        self.num_steps_ahead += 1
        requests = [r for r, _ in scheduled]
        if any(r.grammar is not None for r in requests):
            return Launched(requests, logits)
        return InFlight(requests, self.sampler.sample_tensor(logits, requests))

    def _stops_by_length(self, request: Request) -> bool:
        """Will the token in flight end this request by max_tokens or the context (the engine's stop
        rule, LLMEngine._stop_status)?"""
        num_tokens = len(request.all_token_ids) + 1
        num_output = num_tokens - len(request.prompt_token_ids)
        return num_output >= (request.params.max_tokens or 0) or num_tokens >= self.max_model_len
