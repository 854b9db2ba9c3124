"""Per-tenant fairness: deficit round robin over fairness keys, charged in tokens, measured."""

from __future__ import annotations

from engine.request import LoRARequest, RequestStatus
from tests.engine.sched_fakes import Harness, SlotTable, make_scheduler, req


def unique(n: int, length: int) -> list[int]:
    """A prompt no other request shares, so prefix-cache hits do not blur the token accounting."""
    return [n * 1000 + j for j in range(length)]


def flood(s, heavy: int, light: int, light_key: str) -> list[str]:
    for i in range(heavy):
        s.add(req(f"h{i}", unique(i, 32), max_tokens=8, key="heavy"))
    names = [f"l{i}" for i in range(light)]
    for j, name in enumerate(names):
        s.add(req(name, unique(500 + j, 32), max_tokens=8, key=light_key))
    return names


def test_a_flooding_tenant_cannot_starve_a_light_one():
    s = make_scheduler(num_blocks=256, max_num_seqs=4, max_num_batched_tokens=64)
    light = flood(s, heavy=50, light=3, light_key="light")
    h = Harness(s)
    h.run()
    worst_light = max(h.finished_at[n] for n in light)
    # Under FIFO the light requests would wait behind all 50 heavy ones (see the control below);
    # with fair admission they finish within a small, fixed number of steps.
    assert worst_light <= 20, worst_light
    heavy_done = sorted(h.finished_at[f"h{i}"] for i in range(50))
    assert heavy_done[-1] > 100  # the heavy tenant still got the rest of the machine


def test_a_light_tenant_arriving_mid_flood_is_served_within_bounded_steps():
    s = make_scheduler(num_blocks=256, max_num_seqs=4, max_num_batched_tokens=64)
    flood(s, heavy=50, light=0, light_key="light")
    h = Harness(s)
    for _ in range(30):
        h.step()
    s.add(req("late", unique(900, 32), max_tokens=8, key="light"))
    start = h.step_count
    h.run()
    # A seat frees every couple of steps; the next one goes to the light tenant, then 8 tokens of decode.
    assert h.finished_at["late"] - start <= 12, h.finished_at["late"] - start


def test_control_without_distinct_keys_the_light_requests_wait_behind_the_flood():
    s = make_scheduler(num_blocks=256, max_num_seqs=4, max_num_batched_tokens=64)
    light = flood(s, heavy=50, light=3, light_key="heavy")  # same key = plain FIFO
    h = Harness(s)
    h.run()
    assert min(h.finished_at[n] for n in light) > 100


def test_token_share_is_even_while_both_tenants_have_work():
    s = make_scheduler(num_blocks=512, max_num_seqs=8, max_num_batched_tokens=64, quantum=32)
    for i in range(40):
        s.add(req(f"a{i}", unique(i, 24), max_tokens=4, key="a"))
    for i in range(40):
        s.add(req(f"b{i}", unique(100 + i, 24), max_tokens=4, key="b"))
    h = Harness(s)
    while s.num_waiting > 10:
        h.step()
    a, b = h.tokens_by_key["a"], h.tokens_by_key["b"]
    assert 0.8 <= a / b <= 1.25, (a, b)


def test_long_prompts_are_charged_by_tokens_not_by_request():
    # Tenant "long" sends 4x longer prompts: it should get about as many tokens, so ~4x fewer requests.
    s = make_scheduler(num_blocks=1024, max_num_seqs=16, max_num_batched_tokens=128, quantum=64)
    for i in range(30):
        s.add(req(f"long{i}", unique(i, 64), max_tokens=1, key="long"))
    for i in range(120):
        s.add(req(f"short{i}", unique(100 + i, 16), max_tokens=1, key="short"))
    h = Harness(s)
    for _ in range(12):
        h.step()
    done_long = sum(1 for k in h.finished_at if k.startswith("long"))
    done_short = sum(1 for k in h.finished_at if k.startswith("short"))
    assert done_long > 0 and done_short >= 2.5 * done_long, (done_long, done_short)
    ratio = h.tokens_by_key["long"] / h.tokens_by_key["short"]
    assert 0.6 <= ratio <= 1.6, h.tokens_by_key


def test_idle_key_earns_no_burst_credit():
    s = make_scheduler(num_blocks=256, max_num_seqs=4, max_num_batched_tokens=64, quantum=32)
    s.add(req("x0", [1] * 8, max_tokens=1, key="x"))
    h = Harness(s)
    h.run()
    assert "x" not in s.deficit  # emptied queue: credit dropped
    assert not s.queues and not s.slot_wait_steps  # nothing kept per tenant once it has no work


def slot_flood(slots: SlotTable, arrive: int, patience: int = 4) -> int:
    """A heavy tenant keeps both adapter slots pinned with its own two adapters; a light tenant's request
    for a third adapter arrives mid-flood. Returns how many steps the light request took."""
    s = make_scheduler(num_blocks=512, max_num_seqs=4, max_num_batched_tokens=64, slots=slots)
    s.slot_patience = patience
    heavy = [LoRARequest(f"h{i}", content_hash=f"{i}" * 64) for i in range(2)]
    for i in range(50):
        s.add(req(f"h{i}", unique(i, 32), max_tokens=8, key="heavy", lora=heavy[i % 2]))
    h = Harness(s)
    for _ in range(arrive):
        h.step()
    s.add(
        req("light", unique(900, 32), max_tokens=8, key="light", lora=LoRARequest("l", content_hash="f" * 64))
    )
    h.run()
    assert all(v == 0 for v in slots.pins.values())
    return h.finished_at["light"] - arrive


def test_a_tenant_keeping_every_adapter_slot_busy_cannot_starve_another_tenants_adapter():
    waits = [slot_flood(SlotTable(2), arrive) for arrive in (5, 30, 61)]
    # Patience (4 steps), then the heavy tenant's running adapter requests drain (~9 steps), then 9 steps.
    assert max(waits) <= 25, waits
    control = [slot_flood(SlotTable(2), arrive, patience=10**9) for arrive in (5, 30, 61)]
    assert min(control) > 40, control  # without it, the light request waits for the whole flood


class LoadingSlots(SlotTable):
    has_pending_loads = True  # as if a download were still running somewhere


def test_no_holding_back_while_adapters_are_still_loading():
    assert slot_flood(LoadingSlots(2), 5) > 40


def test_memory_pressure_preempts_the_tenant_holding_the_most_blocks():
    s = make_scheduler(num_blocks=40, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    heavy = [req(f"h{i}", unique(i, 8), max_tokens=24, key="heavy") for i in range(6)]
    for r in heavy:
        s.add(r)
    h = Harness(s)
    for _ in range(3):
        h.step()
    light = [req(f"l{i}", unique(100 + i, 8), max_tokens=24, key="light") for i in range(2)]
    for r in light:
        s.add(r)
    victims = []
    while s.has_unfinished():
        out = s.schedule()
        victims += [(r.fairness_key, r.request_id) for r in out.preempted]
        s.advance(out)
        for r, _ in out.scheduled:
            if r.num_computed_tokens == r.num_tokens:
                r.append_token(1)
                if r.num_output_tokens >= 24:
                    s.finish(r, RequestStatus.FINISHED_LENGTH)
    # The light tenant arrived last but holds the least memory: the first victims are heavy's.
    assert victims[0][0] == "heavy" and victims[1][0] == "heavy", victims
    assert light[0].num_preemptions == 0


def test_ten_tenants_queued_one_after_another_are_served_round_robin():
    s = make_scheduler(num_blocks=512, max_num_seqs=4, max_num_batched_tokens=64)
    for k in range(10):
        for i in range(10):
            s.add(req(f"k{k}-{i}", unique(k * 10 + i, 16), max_tokens=4, key=f"tenant{k}"))
    h = Harness(s)
    h.run()
    order = sorted(h.finished_at, key=lambda rid: (h.finished_at[rid], rid))
    first_twenty = {rid.split("-")[0] for rid in order[:20]}
    assert first_twenty == {f"k{k}" for k in range(10)}, order[:20]  # FIFO would give only k0 and k1
