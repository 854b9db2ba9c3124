"""Continuous batching over one rule: a request needs tokens [num_computed_tokens, num_tokens) computed.

Prefill, chunked prefill, decode, prefix hits and recompute after preemption all fall out of that rule.
Each step: running requests first (in admission order; when blocks run out, the tenant holding the most
blocks gives one up), then admission of waiting requests by deficit round robin over fairness keys,
charged in tokens, so that one tenant flooding the queue cannot starve the others, nor keep every adapter
slot to itself. Plain Python, no torch.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Protocol

from engine.block_manager import BlockManager
from engine.request import LoRARequest, Request, RequestStatus


class AdapterSlots(Protocol):
    """The part of AdapterCache the scheduler uses (engine/adapter_cache.py)."""

    def acquire(self, lora: LoRARequest) -> int | None: ...
    def release(self, lora: LoRARequest) -> None: ...

    # Also read when present: has_pending_loads (bool), True while a background load runs.


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Requests that cannot run at all (their adapter failed to load); already finished with an error.
    failed: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        adapter_slots: AdapterSlots | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        fairness_quantum: int | None = None,
        slot_patience: int = 4,
    ) -> None:
        self.block_manager = block_manager
        self.adapter_slots = adapter_slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Tokens a fairness key earns per round-robin turn. Small, so that a key never admits much more
        # than a quantum's worth before the others get a turn (a key with long prompts just needs more
        # turns to save up; turns are cheap).
        self.quantum = fairness_quantum or 4 * block_manager.block_size
        self.running: list[Request] = []
        # Waiting requests per fairness key; the dict's order is the round-robin ring, head = current turn.
        self.queues: OrderedDict[str, deque[Request]] = OrderedDict()
        self.deficit: dict[str, int] = {}
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # since start, for stats and tests
        self._lookups: dict[str, int] = {}  # cached tokens per request id, for one step's credit checks
        # Adapters (content hashes) that got no slot earlier in this step (loading, or every slot pinned):
        # their other requests are passed over without another acquire or prefix lookup, so a queue full
        # of requests waiting for loads costs each step one look per adapter, not one per request and turn.
        self._unready: set[str] = set()
        # Steps in a row in which a key had requests but none could get an adapter slot. After
        # slot_patience of them, other keys stop pinning adapters for new requests until it gets one:
        # otherwise a tenant keeping every slot busy with its own adapters starves the others' adapters.
        self.slot_patience = slot_patience
        self.slot_wait_steps: dict[str, int] = {}

    # ---- queue bookkeeping ----
    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def waiting(self) -> list[Request]:
        return [r for q in self.queues.values() for r in q]

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        longest = request.num_tokens + (request.params.max_tokens or 0) - request.num_output_tokens
        if self.block_manager.blocks_needed(longest) > self.block_manager.num_blocks:
            # Alone in the engine it would still preempt itself forever.
            raise ValueError(
                f"request needs {longest} tokens but the KV cache holds only "
                f"{self.block_manager.num_blocks * self.block_manager.block_size}"
            )
        self.requests[request.request_id] = request
        self._enqueue(request, front=False)

    def _enqueue(self, request: Request, front: bool) -> None:
        request.status = RequestStatus.WAITING
        key = request.fairness_key
        if key not in self.queues:
            self.queues[key] = deque()
            self.deficit[key] = 0
        if front:
            self.queues[key].appendleft(request)
        else:
            self.queues[key].append(request)

    def _remove_waiting(self, request: Request) -> None:
        key = request.fairness_key
        queue = self.queues[key]
        queue.remove(request)
        if not queue:
            self._drop_key(key)

    def _drop_key(self, key: str) -> None:
        # Classic DRR: a key whose queue empties loses its saved credit, so idling earns no burst later.
        del self.queues[key]
        del self.deficit[key]
        self.slot_wait_steps.pop(key, None)

    # ---- leaving the engine ----
    def _release(self, request: Request) -> None:
        self.block_manager.free(request)
        if request.lora is not None and request.lora_slot >= 0 and self.adapter_slots is not None:
            self.adapter_slots.release(request.lora)
        request.lora_slot = -1

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out (finished, aborted or failed); frees its blocks and adapter pin."""
        assert status.finished
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self._release(request)
        elif request.status == RequestStatus.WAITING:
            self._remove_waiting(request)
        request.status = status
        request.metrics.finished_time = time.monotonic()
        self.requests.pop(request.request_id, None)

    def _preempt(self, request: Request) -> None:
        """Recompute later: drop the KV (cached full blocks stay findable) and requeue at the front."""
        self._release(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request, front=True)

    # ---- for the step guard (engine/step_guard.py), after a step raised ----
    def preempt_all(self) -> list[Request]:
        """Preempt every running request (the failed step's KV writes cannot be trusted); returns them."""
        running = list(self.running)
        self.running.clear()
        for request in running:
            self._preempt(request)
        return running

    def hold(self, request: Request) -> None:
        """Take a waiting request out of its queue; it stays known until readmit() or finish()."""
        self._remove_waiting(request)

    def readmit(self, request: Request, front: bool) -> None:
        self._enqueue(request, front)

    # ---- the step ----
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        allocate_slots = self.block_manager.allocate_slots
        running = list(self.running)
        reserve = self._blocks_after(running) if any(r.spec_token_ids for r in running) else []
        for index, request in enumerate(running):
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(len(request.all_token_ids) - request.num_computed_tokens, budget)
            drafts = request.spec_token_ids
            if drafts:
                # Verify the drafts in this step (engine/spec/): k + 1 query tokens, blocks for all of
                # them; only blocks of real tokens are ever hashed (the block manager hashes all_token_ids,
                # which never holds drafts here). Short of budget or blocks, the sequence just decodes:
                # blocks for drafts never come at the cost of a preemption (each request after this one
                # may need a free block for its own next token).
                if (
                    n == 1
                    and budget > len(drafts)
                    and self._draft_blocks_fit(request, reserve[index])
                    and allocate_slots(request, 1 + len(drafts))
                ):
                    n = 1 + len(drafts)
                else:
                    request.spec_token_ids = []
            while not allocate_slots(request, n):
                victim = self._pick_victim()
                budget += self._unschedule(out, victim)
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue
            out.scheduled.append((request, n))
            budget -= n
            if request.num_computed_tokens >= len(request.prompt_token_ids):
                self._charge(request.fairness_key, n)  # decode tokens count against a key's share too
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _blocks_after(self, running: list[Request]) -> list[int]:
        """For each running request, the new blocks the requests after it need for their own tokens."""
        bm = self.block_manager
        needs = [max(bm.blocks_needed(r.num_tokens) - len(r.block_table), 0) for r in running]
        after, total = [0] * len(running), 0
        for i in range(len(running) - 1, -1, -1):
            after[i] = total
            total += needs[i]
        return after

    def _draft_blocks_fit(self, request: Request, reserved: int) -> bool:
        bm = self.block_manager
        upto = request.num_computed_tokens + 1 + len(request.spec_token_ids)
        return bm.blocks_needed(upto) - len(request.block_table) <= bm.num_free_blocks - reserved

    def _pick_victim(self) -> Request:
        """Whom to preempt when blocks run out: the most recently admitted request of the key holding the
        most blocks, so memory pressure falls on the tenant using the memory, not on whoever came last."""
        held: dict[str, int] = {}
        for r in self.running:
            held[r.fairness_key] = held.get(r.fairness_key, 0) + len(r.block_table)
        return max(reversed(self.running), key=lambda r: held[r.fairness_key])

    @staticmethod
    def _unschedule(out: SchedulerOutput, request: Request) -> int:
        """Take a request back out of this step (it is being preempted); returns the tokens it had."""
        for j, (r, n) in enumerate(out.scheduled):
            if r is request:
                del out.scheduled[j]
                return n
        return 0

    def _charge(self, key: str, tokens: int) -> None:
        if key in self.deficit:
            # Floored, so a long decode-heavy stretch costs a bounded number of turns, not a lockout.
            self.deficit[key] = max(self.deficit[key] - tokens, -8 * self.quantum)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        self._lookups = {}
        self._unready = set()
        starving = {
            k for k, n in self.slot_wait_steps.items() if n >= self.slot_patience and k in self.queues
        }
        visited: dict[str, str] = {}
        blocked: set[str] = set()  # keys with nothing admittable this step
        while budget > 0 and len(self.running) < self.max_num_seqs:
            key = next((k for k in self.queues if k not in blocked), None)
            if key is None:
                break
            hold = bool(starving) and key not in starving
            outcome, budget = self._serve_turn(key, out, budget, hold_adapters=hold)
            visited[key] = outcome if visited.get(key) != "admitted" else "admitted"
            if outcome == "full":
                break  # the step is full; this key resumes its turn next step
            if outcome in ("blocked", "held"):
                # It keeps its place at the front of the ring: when a slot frees up, it asks first.
                blocked.add(key)
                continue
            if outcome == "deficit":
                self.deficit[key] += self.quantum
            if key in self.queues:
                self.queues.move_to_end(key)
        # While an adapter is still loading, "no slot" may just mean "not loaded yet": a hung download
        # must never make everyone else hold back their adapters.
        loading = bool(getattr(self.adapter_slots, "has_pending_loads", False))
        for key, outcome in visited.items():
            if outcome == "blocked" and key in self.queues and not loading:
                self.slot_wait_steps[key] = self.slot_wait_steps.get(key, 0) + 1
            elif outcome in ("admitted", "emptied", "full"):
                self.slot_wait_steps.pop(key, None)

    def _serve_turn(
        self, key: str, out: SchedulerOutput, budget: int, hold_adapters: bool
    ) -> tuple[str, int]:
        """Admit this key's requests while its deficit covers them. Requests whose adapter cannot get a GPU
        slot now are skipped, not waited on (hold_adapters: skip every adapter request, to let a starving
        key have the next free slot). Returns (outcome, budget left): "full" (step out of tokens, seats or
        blocks), "deficit" (turn over, credit short), "admitted"/"emptied" (admitted some, nothing more
        admittable), "blocked" (nothing: no adapter slot), "held" (nothing: adapters held back)."""
        progressed = held = False
        for request in list(self.queues[key]):
            if request.lora is not None and request.lora.key in self._unready:
                continue  # its adapter could not be had earlier in this step: never wait behind a load
            # Turns come round often (small quantum): remember the hit length for the credit check only.
            known = self._lookups.get(request.request_id)
            if known is None:
                known = self._lookups[request.request_id] = self.block_manager.get_computed_blocks(request)[1]
            if request.num_tokens - known > self.deficit[key]:
                return "deficit", budget
            slot = -1
            if request.lora is not None and hold_adapters:
                held = True
                continue
            if request.lora is not None:
                assert self.adapter_slots is not None, "a LoRA request needs an adapter cache"
                try:
                    acquired = self.adapter_slots.acquire(request.lora)
                except Exception as exc:  # a failed background load: this request cannot run
                    request.error = str(exc) or type(exc).__name__
                    self.finish(request, RequestStatus.FINISHED_ERROR)
                    out.failed.append(request)
                    if key not in self.queues:
                        return "emptied", budget
                    continue
                if acquired is None:
                    self._unready.add(request.lora.key)
                    continue
                slot = acquired
            # Fresh lookup: admissions earlier in this step may have evicted or added cached blocks.
            hits, num_cached = self.block_manager.get_computed_blocks(request)
            cost = request.num_tokens - num_cached
            n = min(cost, budget)
            if not self.block_manager.allocate_slots(request, n, hits):
                if request.lora is not None:
                    self.adapter_slots.release(request.lora)  # type: ignore[union-attr]
                return "full", budget
            self.deficit[key] -= cost
            self._remove_waiting(request)
            self.block_manager.record_lookup(request.num_tokens, num_cached)
            request.lora_slot = slot
            request.status = RequestStatus.RUNNING
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.scheduled.append((request, n))
            budget -= n
            progressed = True
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                return "full", budget
            if key not in self.queues:
                return "admitted", budget
        if progressed:
            return "admitted", budget
        return ("held" if held else "blocked"), budget

    def schedule_ahead(self, requests: list[Request]) -> list[tuple[Request, int]] | None:
        """Async scheduling: the next decode step, made while the current one still runs, before its
        tokens are known. `requests` are the running requests that will go on (the caller leaves out
        those certain to stop), one new token each at position num_computed_tokens. None where schedule()
        could decide anything else: a request waits for admission, the step is over the token budget, or
        the free blocks do not cover it (schedule() would preempt). Blocks are taken only when all fit."""
        if self.queues or not requests or len(requests) > self.max_num_batched_tokens:
            return None
        bm = self.block_manager
        new_blocks = sum(r.num_computed_tokens + 1 > len(r.block_table) * bm.block_size for r in requests)
        if new_blocks > bm.num_free_blocks:
            return None
        for request in requests:
            if request.status is not RequestStatus.RUNNING or not bm.allocate_slots(request, 1):
                raise RuntimeError(f"request {request.request_id} cannot be scheduled ahead")
            self._charge(request.fairness_key, 1)
        return [(r, 1) for r in requests]

    def advance_ahead(self, requests: list[Request]) -> None:
        """A step schedule_ahead made has run for these requests, and the token each computed in it is on
        the host now: count it computed, and offer a block it filled to the prefix cache (schedule_ahead
        could not hash that block: its last token was not known yet)."""
        for request in requests:
            request.num_computed_tokens += 1
            self.block_manager.allocate_slots(request, 0)  # registers the newly full block, if any

    def advance(self, out: SchedulerOutput) -> None:
        """After the model ran: the scheduled tokens are computed."""
        for request, n in out.scheduled:
            request.num_computed_tokens += n
