"""Keeping the engine alive when one request's data makes a step raise.

The door (LLMEngine.add_request) refuses every value known to break a step, so a step that raises is
either the engine's own fault or a request's data the door did not foresee. The first kind ends the
engine (AsyncLLMEngine marks it dead); the second must fail only the request it belongs to.

A step's exception does not say which row caused it, so blame is found by isolation:
1. Every request running in the failed step is preempted (its KV blocks freed, its computed count
   reset, its tokens kept), which puts the scheduler and block manager back in a state that any step may
   start from: they recompute later, as after an ordinary preemption, so an innocent one's greedy output
   is unchanged.
2. The suspects are those of them that never got a token out of an earlier step, plus the one on trial
   (below); a request that did is cleared, since its data went through steps before. When all of them
   are cleared (a fault late in some request's life), all of them are suspects.
3. One suspect alone is the culprit: it fails (FINISHED_ERROR, its own error) and everyone else goes on.
4. Several suspects are held out of the scheduler and let back in one at a time ("on trial"), beside
   the cleared requests. A trial ends well once its request has produced a token (or finished); a step
   that fails with the request on trial as its only suspect fails that request only.
The engine is declared broken when the failure is of a kind only the engine can cause (an accelerator
error, a broken invariant, an explicit EngineFault), or when MAX_FAILED_STEPS steps in a row fail.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from engine.request import Request, RequestOutput, RequestStatus

if TYPE_CHECKING:
    from engine.engine import LLMEngine

log = logging.getLogger(__name__)

# Consecutive failed steps after which no request is blamed any more: the engine itself is broken.
MAX_FAILED_STEPS = 16
REQUEST_FAILED_MESSAGE = "the engine could not process this request"
# Text of errors that come from the device or its libraries: after one of these the device state (a CUDA
# context after a device-side assert, a communicator) cannot be trusted by any request.
_ACCELERATOR_MARKERS = ("CUDA", "CUBLAS", "cuDNN", "NCCL", "device-side assert", "HIP error", "out of memory")


class EngineFault(RuntimeError):
    """Raised by engine code (or a worker) for a fault of the engine itself: never blamed on a request."""


def is_engine_fault(exc: BaseException) -> bool:
    if isinstance(exc, EngineFault | AssertionError | MemoryError | torch.cuda.OutOfMemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _ACCELERATOR_MARKERS)


class StepGuard:
    """Owned by the engine loop's thread (AsyncLLMEngine): every method runs there."""

    def __init__(self, engine: LLMEngine, max_failed_steps: int = MAX_FAILED_STEPS) -> None:
        self.engine = engine
        self.max_failed_steps = max_failed_steps
        self.held: deque[Request] = deque()  # suspects waiting for their trial, outside the scheduler
        self.trial: Request | None = None
        self._trial_tokens = 0  # the trial's output tokens when it went on trial
        self._step_started = 0.0  # monotonic start of the step in progress
        self.failures_in_a_row = 0
        self.num_failed_steps = 0  # since start, for stats and tests
        self.num_failed_requests = 0

    def before_step(self) -> None:
        """End a trial that went well, and put the next held suspect on trial when none is."""
        trial = self.trial
        if trial is not None and (trial.is_finished or trial.num_output_tokens > self._trial_tokens):
            self.trial = None
        if self.trial is None and self.held:
            suspect = self.held.popleft()
            self.engine.scheduler.readmit(suspect, front=True)
            self.trial, self._trial_tokens = suspect, suspect.num_output_tokens
        self._step_started = time.monotonic()

    def succeeded(self) -> None:
        self.failures_in_a_row = 0

    def recover(self, exc: Exception) -> list[RequestOutput]:
        """After step() raised `exc`: fail the request it is blamed on (if one can be), restore a state
        the next step can start from, and return the outputs to deliver. Raises EngineFault when the
        engine itself is at fault."""
        self.num_failed_steps += 1
        self.failures_in_a_row += 1
        if is_engine_fault(exc):
            raise EngineFault(f"engine fault in a step: {type(exc).__name__}: {exc}") from exc
        if self.failures_in_a_row > self.max_failed_steps:
            raise EngineFault(
                f"{self.failures_in_a_row} steps in a row failed, the last with {exc!r}"
            ) from exc
        scheduler = self.engine.scheduler
        self.engine.ahead.drop()  # its tokens belong to the failed step: they are recomputed
        running = scheduler.preempt_all()
        suspects = [r for r in running if not self._cleared(r)] or running
        if self.trial in suspects:
            self.trial = None
        if len(suspects) == 1:
            culprits = suspects
        else:
            culprits = []
            for request in suspects:
                scheduler.hold(request)
                self.held.append(request)
        log.warning(
            "a step failed (%s: %s); %d running, %d suspected, blamed: %s, held for trial: %d",
            type(exc).__name__,
            exc,
            len(running),
            len(suspects),
            [r.request_id for r in culprits] or "none yet",
            len(self.held),
            exc_info=exc,
        )
        for request in culprits:
            request.error = REQUEST_FAILED_MESSAGE
            scheduler.finish(request, RequestStatus.FINISHED_ERROR)
            self.num_failed_requests += 1
        return self._unreported()

    def _cleared(self, request: Request) -> bool:
        """Not suspected of this failure: the request got a token out of an earlier step (which it could
        not have, had its data broken steps), and is not the one on trial. Any request can be suspected
        again when none of the failed step's requests is new (see recover)."""
        first = request.metrics.first_token_time
        return request is not self.trial and first is not None and first < self._step_started

    def unhold(self, request_id: str) -> None:
        """Put a caller request's held sequences back in the scheduler (before it is aborted)."""
        mine = [r for r in self.held if (r.parent_id or r.request_id) == request_id]
        for request in mine:
            self.held.remove(request)
            self.engine.scheduler.readmit(request, front=False)

    def _unreported(self) -> list[RequestOutput]:
        """Outputs for the sequences that finished in the failed step or were failed now: the step never
        got to report them. (A group of n > 1 may see a finished sample's output twice, with no delta.)"""
        finished = [c for g in self.engine.groups.values() for c in g.children if c.is_finished]
        return self.engine._collect(finished) if finished else []
