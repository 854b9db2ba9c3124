"""Small deterministic stand-ins for the model side, to test scheduling on its own.

The next token is a pure function of the whole sequence so far, so any scheduling mistake (lost KV,
wrong recompute after preemption) would change outputs, exactly like a real model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.request import LoRARequest, Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 31 + len(tokens)) % 1000


class SlotTable:
    """A tiny adapter-slot table with the AdapterCache contract: pinned slots are never given away."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.slots: OrderedDict[str, int] = OrderedDict()  # content hash -> slot, LRU order
        self.pins: dict[str, int] = {}
        self.acquires = 0

    def acquire(self, lora: LoRARequest) -> int | None:
        key = lora.key
        self.acquires += 1
        if key in self.slots:
            self.slots.move_to_end(key)
        else:
            free = set(range(self.num_slots)) - set(self.slots.values())
            if free:
                self.slots[key] = min(free)
            else:
                victim = next((k for k in self.slots if self.pins.get(k, 0) == 0), None)
                if victim is None:
                    return None
                self.slots[key] = self.slots.pop(victim)
        self.pins[key] = self.pins.get(key, 0) + 1
        return self.slots[key]

    def release(self, lora: LoRARequest) -> None:
        assert self.pins.get(lora.key, 0) > 0, "release without acquire"
        self.pins[lora.key] -= 1


@dataclass
class Harness:
    scheduler: Scheduler
    step_count: int = 0
    finished_at: dict[str, int] = field(default_factory=dict)
    tokens_by_key: dict[str, int] = field(default_factory=dict)

    # A stand-in for the KV cache: which token's KV each slot holds. Reading a slot that holds another
    # token's KV (a stale prefix hit, a block never written, a wrong block table) fails the test.
    kv: dict[int, int] = field(default_factory=dict)

    def _run_model(self, scheduled: list[tuple[Request, int]]) -> None:
        bs = self.scheduler.block_manager.block_size

        def slot(request: Request, position: int) -> int:
            return request.block_table[position // bs] * bs + position % bs

        # Like the model: every token's KV of the step is written before any attention reads.
        for request, n in scheduled:
            for p in range(request.num_computed_tokens, request.num_computed_tokens + n):
                self.kv[slot(request, p)] = request.all_token_ids[p]
        for request, n in scheduled:
            for p in range(request.num_computed_tokens + n):
                assert self.kv.get(slot(request, p)) == request.all_token_ids[p], (request.request_id, p)

    def step(self) -> list[tuple[Request, int]]:
        out = self.scheduler.schedule()
        self._run_model(out.scheduled)
        self.scheduler.advance(out)
        self.step_count += 1
        for request, n in out.scheduled:
            self.tokens_by_key[request.fairness_key] = self.tokens_by_key.get(request.fairness_key, 0) + n
            assert (
                len(request.block_table) * self.scheduler.block_manager.block_size
                >= request.num_computed_tokens
            )
            if request.num_computed_tokens == request.num_tokens:
                request.append_token(next_token(request.all_token_ids))
                if request.num_output_tokens >= (request.params.max_tokens or 1):
                    self.scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
                    self.finished_at[request.request_id] = self.step_count
        return out.scheduled

    def run(self, max_steps: int = 10_000) -> None:
        while self.scheduler.has_unfinished():
            assert self.step_count < max_steps, "scheduler made no progress"
            self.step()


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    slots: SlotTable | None = None,
    prefix_caching: bool = True,
    quantum: int | None = None,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(bm, slots, max_num_seqs, max_num_batched_tokens, quantum)


def req(
    rid: str,
    prompt: list[int],
    max_tokens: int = 4,
    key: str = "",
    lora: LoRARequest | None = None,
    salt: str | None = None,
) -> Request:
    return Request(
        rid, prompt, SamplingParams(max_tokens=max_tokens), lora=lora, fairness_key=key, cache_salt=salt
    )


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]
