"""Scheduler: token budget, chunked prefill, seats, preemption by recompute, adapter-slot admission."""

from __future__ import annotations

import pytest

from engine.request import LoRARequest, RequestStatus
from tests.engine.sched_fakes import Harness, SlotTable, expected_output, make_scheduler, next_token, req

LORA_A = LoRARequest("a", content_hash="a" * 64)
LORA_B = LoRARequest("b", content_hash="b" * 64)


def test_chunked_prefill_then_decode_one_token_per_step():
    s = make_scheduler(max_num_batched_tokens=8)
    r = req("r", list(range(1, 21)), max_tokens=3)
    s.add(r)
    h = Harness(s)
    chunks = [h.step()[0][1] for _ in range(5)]
    assert chunks == [8, 8, 4, 1, 1]
    assert r.is_finished and r.output_token_ids == expected_output(list(range(1, 21)), 3)


def test_running_requests_go_first_and_share_the_budget():
    s = make_scheduler(max_num_batched_tokens=10)
    a, b = req("a", list(range(1, 7)), 5), req("b", list(range(11, 17)), 5)
    s.add(a)
    s.add(b)
    h = Harness(s)
    assert [(r.request_id, n) for r, n in h.step()] == [("a", 6), ("b", 4)]
    # a decodes (1), b finishes its prompt (2).
    assert [(r.request_id, n) for r, n in h.step()] == [("a", 1), ("b", 2)]
    assert [(r.request_id, n) for r, n in h.step()] == [("a", 1), ("b", 1)]


def test_max_num_seqs_caps_the_batch():
    s = make_scheduler(max_num_seqs=2)
    for i in range(5):
        s.add(req(f"r{i}", [i + 1, 2, 3], 3))
    h = Harness(s)
    assert len(h.step()) == 2
    assert s.num_running == 2 and s.num_waiting == 3
    h.run()
    assert len(h.finished_at) == 5


def test_preemption_by_recompute_keeps_outputs_and_requeues_at_the_front():
    prompts = {f"r{i}": [i + 1] * 6 + list(range(i * 10, i * 10 + 5)) for i in range(4)}
    s = make_scheduler(num_blocks=10, block_size=4, max_num_batched_tokens=64)
    reqs = [req(rid, p, max_tokens=12) for rid, p in prompts.items()]
    for r in reqs:
        s.add(r)
    h = Harness(s)
    preempted = []
    while s.has_unfinished():
        out = s.schedule()
        preempted += [r.request_id for r in out.preempted]
        if out.preempted:
            # The victim is the most recently admitted one, and it waits at the head of its queue.
            assert s.waiting()[0] is out.preempted[-1]
            assert out.preempted[-1].num_computed_tokens == 0 and out.preempted[-1].block_table == []
        s.advance(out)
        for r, _ in out.scheduled:
            if r.num_computed_tokens == r.num_tokens:
                r.append_token(next_token(r.all_token_ids))
                if r.num_output_tokens >= 12:
                    s.finish(r, RequestStatus.FINISHED_LENGTH)
        h.step_count += 1
        assert h.step_count < 1000
    assert preempted, "the tiny KV cache must force preemption"
    for r in reqs:
        assert r.output_token_ids == expected_output(prompts[r.request_id], 12)
    assert s.block_manager.num_free_blocks == 10


def test_a_request_alone_preempts_itself_only_when_nothing_else_can_go():
    s = make_scheduler(num_blocks=3, block_size=4, max_num_batched_tokens=64)
    r = req("r", [1, 2, 3, 4, 5], max_tokens=7)  # 12 tokens = 3 blocks, fits alone
    s.add(r)
    Harness(s).run()
    assert r.output_token_ids == expected_output([1, 2, 3, 4, 5], 7)
    assert r.num_preemptions == 0


def test_adapter_slots_bound_admission_without_head_of_line_blocking():
    slots = SlotTable(1)
    s = make_scheduler(slots=slots)
    a1 = req("a1", [1, 2, 3], 4, lora=LORA_A)
    b1 = req("b1", [1, 2, 3], 4, lora=LORA_B)
    base = req("base", [4, 5, 6], 4)
    a2 = req("a2", [7, 8, 9], 4, lora=LORA_A)
    for r in (a1, b1, base, a2):
        s.add(r)
    h = Harness(s)
    first = {r.request_id for r, _ in h.step()}
    # b1 cannot get the only slot while a-requests hold it, but does not block base or a2 behind it.
    assert first == {"a1", "base", "a2"}
    assert a1.lora_slot == a2.lora_slot == 0 and base.lora_slot == -1
    assert b1.status == RequestStatus.WAITING
    h.run()
    assert b1.is_finished and h.finished_at["b1"] > h.finished_at["a1"]
    assert slots.pins == {"a" * 64: 0, "b" * 64: 0}


def test_adapter_pin_is_released_on_preempt_and_on_abort():
    slots = SlotTable(2)
    s = make_scheduler(slots=slots, num_blocks=4, block_size=4)
    a = req("a", list(range(1, 9)), 8, lora=LORA_A)
    b = req("b", list(range(11, 19)), 8, lora=LORA_B)
    s.add(a)
    s.add(b)
    h = Harness(s)
    h.step()
    assert slots.pins == {"a" * 64: 1, "b" * 64: 1}
    while not b.num_preemptions:
        h.step()
    assert slots.pins["b" * 64] == 0 and b.lora_slot == -1
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    assert slots.pins["a" * 64] == 0 and a.block_table == []
    h.run()
    assert slots.pins == {"a" * 64: 0, "b" * 64: 0}
    assert s.block_manager.num_free_blocks == 4


def test_abort_of_a_waiting_request_and_duplicate_ids():
    s = make_scheduler(max_num_seqs=1)
    a, b = req("a", [1, 2]), req("b", [3, 4])
    s.add(a)
    s.add(b)
    with pytest.raises(ValueError, match="already"):
        s.add(req("a", [5]))
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    assert s.num_waiting == 1 and b.finish_reason == "abort"
    Harness(s).run()
    assert a.is_finished and not s.has_unfinished()


def test_prefix_hit_skips_cached_tokens_and_sets_num_cached_tokens():
    s = make_scheduler(block_size=4)
    prompt = list(range(1, 14))  # 3 full blocks + 1
    a = req("a", prompt, 2, salt="t")
    s.add(a)
    h = Harness(s)
    h.run()
    b = req("b", prompt, 2, salt="t")
    c = req("c", prompt, 2, salt="u")
    s.add(b)
    s.add(c)
    step = dict((r.request_id, n) for r, n in h.step())
    assert b.num_cached_tokens == 12 and step["b"] == 1
    assert c.num_cached_tokens == 0 and step["c"] == 13
    h.run()
    assert b.output_token_ids == c.output_token_ids == a.output_token_ids


def test_waiting_requests_fill_leftover_budget_with_a_chunk():
    s = make_scheduler(max_num_batched_tokens=6)
    a, b = req("a", [1, 2, 3, 4], 5), req("b", list(range(10, 20)), 2)
    s.add(a)
    s.add(b)
    h = Harness(s)
    assert [(r.request_id, n) for r, n in h.step()] == [("a", 4), ("b", 2)]
    assert b.num_computed_tokens == 2 and b.status == RequestStatus.RUNNING


def test_a_request_that_can_never_fit_is_refused_up_front():
    s = make_scheduler(num_blocks=3, block_size=4)
    with pytest.raises(ValueError, match="KV cache"):
        s.add(req("big", list(range(1, 10)), max_tokens=4))  # 13 tokens > 12 slots


class FailingSlots(SlotTable):
    def acquire(self, lora: LoRARequest) -> int | None:
        if lora.key == "b" * 64:
            raise RuntimeError("adapter bbbb could not be loaded: bad safetensors")
        return super().acquire(lora)


def test_a_request_whose_adapter_fails_to_load_fails_alone():
    s = make_scheduler(slots=FailingSlots(2))
    bad = req("bad", [1, 2, 3], 3, lora=LORA_B)
    good = req("good", [1, 2, 3], 3, lora=LORA_A)
    s.add(bad)
    s.add(good)
    out = s.schedule()
    assert out.failed == [bad] and bad.finish_reason == "error" and "bad safetensors" in bad.error
    assert [r for r, _ in out.scheduled] == [good]
    assert "bad" not in s.requests and s.num_waiting == 0


def test_decodes_admitted_earlier_are_never_stalled_by_a_later_long_prefill():
    s = make_scheduler(num_blocks=128, max_num_batched_tokens=8)
    shorts = [req(f"s{i}", [50 + i, 60 + i], 20) for i in range(3)]
    for r in shorts:
        s.add(r)
    h = Harness(s)
    h.step()
    long = req("long", list(range(1, 41)), 2)
    s.add(long)
    for _ in range(4):
        step = dict((r.request_id, n) for r, n in h.step())
        # Running requests go first in admission order; the long prompt is chunked into what is left.
        assert step == {"s0": 1, "s1": 1, "s2": 1, "long": 5}


def check_invariants(s) -> None:
    bm = s.block_manager
    held: dict[int, int] = {}
    for r in s.running:
        assert r.status == RequestStatus.RUNNING
        assert len(r.block_table) == len(set(r.block_table))
        for b in r.block_table:
            held[b] = held.get(b, 0) + 1
    for r in s.waiting():
        assert r.block_table == [] and r.num_computed_tokens == 0
    free = set(bm._free_plain) | set(bm._free_cached)
    assert len(free) == bm.num_free_blocks  # no block listed twice
    for block in bm.blocks:
        assert block.ref_count == held.get(block.block_id, 0)
        assert (block.ref_count == 0) == (block.block_id in free)
    for block_hash, block_id in bm._cached.items():
        assert bm.blocks[block_id].block_hash == block_hash


def run_random_workload(seed: int) -> int:
    """Random arrivals, prompts with shared prefixes, adapters, aborts and a small KV pool; every step
    checks the pool's bookkeeping, and every output must equal the unbatched one. Returns preemptions."""
    import random

    rng = random.Random(seed)
    slots = SlotTable(2)
    loras = [None, LORA_A, LORA_B, LoRARequest("c", content_hash="c" * 64)]
    s = make_scheduler(
        num_blocks=rng.choice([12, 20, 40]),
        block_size=rng.choice([2, 4]),
        max_num_seqs=rng.choice([2, 4, 8]),
        max_num_batched_tokens=rng.choice([5, 16, 64]),
        slots=slots,
        quantum=rng.choice([None, 8]),
    )
    h = Harness(s)
    expected: dict[str, list[int]] = {}
    reqs = []
    shared = [rng.randrange(1, 50) for _ in range(8)]
    for _step in range(40):
        for _ in range(rng.choice([0, 0, 1, 2])):
            n = len(reqs)
            prompt = (shared[: rng.randrange(0, 8)] if rng.random() < 0.5 else []) + [
                rng.randrange(1, 50) for _ in range(rng.randrange(1, 10))
            ]
            max_tokens = rng.randrange(1, 8)
            lora, salt = rng.choice(loras), rng.choice(["s", "t"])
            r = req(f"r{n}", prompt, max_tokens, key=rng.choice("xyz"), lora=lora, salt=salt)
            s.add(r)
            reqs.append(r)
            expected[r.request_id] = expected_output(prompt, max_tokens)
        if reqs and rng.random() < 0.1:
            victim = rng.choice(reqs)
            if not victim.is_finished:
                s.finish(victim, RequestStatus.FINISHED_ABORTED)
        scheduled = h.step()
        assert len(scheduled) <= s.max_num_seqs
        assert sum(n for _, n in scheduled) <= s.max_num_batched_tokens
        check_invariants(s)
    h.run()
    check_invariants(s)
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks
    assert all(v == 0 for v in slots.pins.values())
    for r in reqs:
        if r.finish_reason == "length":
            assert r.output_token_ids == expected[r.request_id], r.request_id
        else:
            assert r.finish_reason == "abort"
            assert r.output_token_ids == expected[r.request_id][: r.num_output_tokens]
    return s.num_preemptions


def test_random_workloads_keep_every_invariant_and_every_output():
    preemptions = [run_random_workload(seed) for seed in range(40)]
    assert sum(preemptions) > 0, "the workloads must exercise preemption too"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"block_size": 0}, "block_size"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"kv_cache_bytes": -1}, "kv_cache_bytes"),
        ({"gpu_memory_fraction": 1.5}, "gpu_memory_fraction"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras"),
        ({"max_lora_rank": 0}, "max_lora_rank"),
        ({"dtype": "float8"}, "dtype"),
        ({"kernel_backend": "cuda"}, "kernel_backend"),
    ],
)
def test_engine_config_errors_name_the_field(kwargs, name):
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match=f"^{name} "):
        EngineConfig(model="m", **kwargs)


def test_a_victim_already_scheduled_this_step_is_taken_out_and_its_new_blocks_forgotten():
    s = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    x2 = req("x2", [31, 32, 33], 5, key="heavy")
    x = req("x", [1, 2, 3, 4, 5, 6, 7], 5, key="heavy")
    y = req("y", [20, 21, 22, 23], 5, key="light")
    for r in (x2, x, y):
        s.add(r)
    h = Harness(s)
    h.step()  # all three prefilled; the pool (4 blocks) is full
    out = s.schedule()
    # x's decode fills its second block (registered for this step); then y needs a block, and the
    # heavy tenant's most recent request, x, already scheduled, is the victim.
    assert out.preempted == [x] and [(r.request_id, n) for r, n in out.scheduled] == [("x2", 1), ("y", 1)]
    assert x.block_table == [] and x.status == RequestStatus.WAITING
    probe = req("probe", [*x.all_token_ids[:8], 99], 1, key="heavy")
    assert s.block_manager.get_computed_blocks(probe)[1] == 4  # block 2's KV was never written
    h._run_model(out.scheduled)
    s.advance(out)
    for r, _ in out.scheduled:
        r.append_token(next_token(r.all_token_ids))
    h.run()
    assert x.output_token_ids == expected_output([1, 2, 3, 4, 5, 6, 7], 5)
