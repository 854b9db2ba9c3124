"""Adapter cache: exact LRU order in both tiers, pinning, evict, background loads, hash re-check,
and the slot contents for adapters of different ranks and target sets (no stale weights on reuse)."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.adapter_cache import AdapterCache, AdapterLoadError
from engine.demo import demo_config, write_adapter
from engine.lora import load_adapter
from engine.lora_slots import LoRASlots
from engine.model_loader import parse_config
from engine.ops import DOWN, GATE_UP, O_PROJ, QKV
from engine.request import LoRARequest

CFG = demo_config(512)
MODEL = parse_config(CFG)
SPECS = {
    "a": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "b": (4, ["q_proj", "v_proj"]),
    "c": (2, ["gate_proj", "down_proj"]),
    "d": (8, ["o_proj", "up_proj"]),
    "e": (4, ["k_proj"]),
}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: write_adapter(root / name, CFG, r=r, lora_alpha=2 * r, target_modules=targets, seed=i)
        for i, (name, (r, targets)) in enumerate(SPECS.items())
    }


def make_cache(max_loras: int = 2, max_cpu: int = 3, loader=None, failure_ttl: float = 2.0) -> AdapterCache:
    slots = LoRASlots(MODEL, max_loras, 8, torch.float32, torch.device("cpu"))

    def read(folder: str, expected_hash: str | None, clock=None):
        return load_adapter(folder, MODEL, 8, torch.float32, expected_hash, clock=clock)

    return AdapterCache(slots, read, max_cpu, loader=loader, failure_ttl=failure_ttl)


def lora(dirs: dict[str, Path], name: str) -> LoRARequest:
    return LoRARequest(name, str(dirs[name]))


def acquire_now(cache: AdapterCache, req: LoRARequest) -> int | None:
    """Acquire, letting a background load (if one starts) finish first."""
    slot = cache.acquire(req)
    if slot is None and cache.has_pending_loads:
        cache.wait_for_loads(timeout=30)
        slot = cache.acquire(req)
    return slot


def test_miss_loads_in_background_then_hits(adapter_dirs: dict[str, Path]) -> None:
    cache = make_cache()
    a = lora(adapter_dirs, "a")
    assert cache.acquire(a) is None  # a miss starts a load and returns at once
    cache.wait_for_loads(timeout=30)
    assert cache.acquire(a) == 0
    assert cache.acquire(a) == 0  # second pin of the same adapter, same slot
    s = cache.stats()
    # The finished load went into the free slot at once: both acquires found it there.
    assert (s["misses"], s["loads"], s["cpu_hits"], s["hits"]) == (1, 1, 0, 2)
    assert (s["gpu_resident"], s["cpu_resident"], s["pinned"]) == (1, 1, 1)
    assert s["load_seconds"] > 0


def test_acquire_never_blocks_on_a_slow_loader(adapter_dirs: dict[str, Path]) -> None:
    gate = threading.Event()

    def slow_loader(req: LoRARequest) -> str:
        gate.wait(timeout=30)
        return str(req.lora_path)

    cache = make_cache(loader=slow_loader)
    a = lora(adapter_dirs, "a")
    start = time.perf_counter()
    for _ in range(5):
        assert cache.acquire(a) is None
    assert time.perf_counter() - start < 0.5
    assert cache.stats()["misses"] == 1  # repeated acquires do not start repeated loads
    gate.set()
    assert acquire_now(cache, a) == 0


def test_lru_eviction_order_of_device_slots(adapter_dirs: dict[str, Path]) -> None:
    cache = make_cache(max_loras=2, max_cpu=5)
    a, b, c = (lora(adapter_dirs, n) for n in "abc")
    assert acquire_now(cache, a) == 0
    assert acquire_now(cache, b) == 1
    cache.release(a)
    cache.release(b)
    assert cache.gpu_order() == [a.content_hash, b.content_hash]
    assert cache.acquire(a) == 0  # touch a: b is now least recently used
    cache.release(a)
    assert acquire_now(cache, c) == 1  # c takes b's slot
    assert cache.gpu_order() == [a.content_hash, c.content_hash]
    assert cache.stats()["gpu_evictions"] == 1
    # b is still in the CPU tier: back on the device without a new load.
    cache.release(c)
    loads = cache.stats()["loads"]
    assert cache.acquire(b) == 0  # a was least recently used now
    assert cache.stats()["loads"] == loads
    assert cache.gpu_order() == [c.content_hash, b.content_hash]


def test_pinned_adapters_are_never_evicted(adapter_dirs: dict[str, Path]) -> None:
    cache = make_cache(max_loras=2, max_cpu=5)
    a, b, c = (lora(adapter_dirs, n) for n in "abc")
    assert acquire_now(cache, a) == 0
    assert acquire_now(cache, b) == 1
    # Both slots pinned: c loads to the CPU tier but gets no slot, however often it asks.
    for _ in range(3):
        assert acquire_now(cache, c) is None
    assert cache.gpu_order() == [a.content_hash, b.content_hash]
    assert cache.slots.scales[0] == pytest.approx(2.0) and cache.slots.scales[1] == pytest.approx(2.0)
    cache.release(b)
    assert cache.acquire(c) == 1
    # a was pinned twice: one release is not enough to free it.
    assert cache.acquire(a) == 0
    cache.release(a)
    assert cache.acquire(lora(adapter_dirs, "d")) is None
    cache.wait_for_loads(timeout=30)
    assert cache.acquire(lora(adapter_dirs, "d")) is None  # a still pinned once, c pinned
    assert cache.gpu_order() == [c.content_hash, a.content_hash]


def test_cpu_tier_is_lru_and_bounded(adapter_dirs: dict[str, Path]) -> None:
    cache = make_cache(max_loras=1, max_cpu=3)
    reqs = [lora(adapter_dirs, n) for n in "abcd"]
    for req in reqs:
        slot = acquire_now(cache, req)
        assert slot == 0
        cache.release(req)
    assert cache.cpu_order() == [r.content_hash for r in reqs[1:]]
    assert cache.stats()["cpu_evictions"] == 1
    assert cache.stats()["cpu_resident"] == 3


def test_evict_unpinned_drops_both_tiers(adapter_dirs: dict[str, Path]) -> None:
    cache = make_cache()
    a = lora(adapter_dirs, "a")
    assert acquire_now(cache, a) == 0
    cache.release(a)
    cache.evict(str(a.content_hash))
    assert cache.gpu_order() == [] and cache.cpu_order() == []
    assert cache.acquire(a) is None  # must be loaded again
    assert cache.stats()["misses"] == 2


def test_evict_pinned_waits_for_last_release(adapter_dirs: dict[str, Path]) -> None:
    cache = make_cache(max_loras=1)
    a, b = lora(adapter_dirs, "a"), lora(adapter_dirs, "b")
    assert acquire_now(cache, a) == 0
    cache.evict(str(a.content_hash))
    # Draining: not handed out again, and its slot is not given to anyone while a request uses it.
    assert cache.acquire(a) is None
    assert acquire_now(cache, b) is None
    assert cache.gpu_order() == [a.content_hash]
    cache.release(a)
    assert cache.gpu_order() == []
    assert cache.acquire(b) == 0


def test_evict_during_load_discards_the_result(adapter_dirs: dict[str, Path]) -> None:
    gate = threading.Event()

    def slow_loader(req: LoRARequest) -> str:
        gate.wait(timeout=30)
        return str(req.lora_path)

    cache = make_cache(loader=slow_loader)
    a = lora(adapter_dirs, "a")
    assert cache.acquire(a) is None
    cache.evict(str(a.content_hash))
    gate.set()
    cache.wait_for_loads(timeout=30)
    assert cache.cpu_order() == []
    assert cache.acquire(a) is None  # a new load, not the discarded one
    assert cache.stats()["misses"] == 2


def test_hash_mismatch_is_refused(adapter_dirs: dict[str, Path]) -> None:
    """A loader returning other weights than the hash the request names must never be served."""
    cache = make_cache(failure_ttl=60)
    a, b = lora(adapter_dirs, "a"), lora(adapter_dirs, "b")
    forged = LoRARequest("a", str(adapter_dirs["b"]), content_hash=a.content_hash)
    assert cache.acquire(forged) is None
    cache.wait_for_loads(timeout=30)
    with pytest.raises(AdapterLoadError, match="does not match"):
        cache.acquire(forged)
    with pytest.raises(AdapterLoadError):  # every waiting request learns it, not only the first
        cache.acquire(forged)
    assert cache.gpu_order() == [] and cache.cpu_order() == []
    assert cache.stats()["load_failures"] == 1
    assert acquire_now(cache, b) == 0  # positive control: the honest one loads


def test_loader_failure_is_reported_then_retried(adapter_dirs: dict[str, Path]) -> None:
    calls: list[str] = []

    def flaky(req: LoRARequest) -> str:
        calls.append(req.lora_name)
        if len(calls) == 1:
            raise OSError("object store unavailable")
        return str(req.lora_path)

    cache = make_cache(loader=flaky, failure_ttl=0.0)
    a = lora(adapter_dirs, "a")
    assert cache.acquire(a) is None
    cache.wait_for_loads(timeout=30)
    with pytest.raises(AdapterLoadError, match="object store unavailable"):
        cache.acquire(a)
    assert acquire_now(cache, a) == 0
    assert len(calls) == 2


def test_mixed_ranks_and_targets_fill_slots_exactly(adapter_dirs: dict[str, Path]) -> None:
    cache = make_cache(max_loras=2)
    a, b, d = lora(adapter_dirs, "a"), lora(adapter_dirs, "b"), lora(adapter_dirs, "d")
    assert acquire_now(cache, a) == 0
    assert acquire_now(cache, b) == 1
    slots = cache.slots
    ad_b = load_adapter(adapter_dirs["b"], MODEL, 8)
    # b: rank 4 on q/v, padded with zeros to rank 8; k and o untouched (zeros).
    assert torch.equal(slots.a["q_proj"][:, 1, :4], ad_b.a["q_proj"])
    assert torch.count_nonzero(slots.a["q_proj"][:, 1, 4:]) == 0
    assert torch.count_nonzero(slots.b["v_proj"][:, 1, :, 4:]) == 0
    assert torch.count_nonzero(slots.a["k_proj"][:, 1]) == 0
    assert torch.count_nonzero(slots.b["o_proj"][:, 1]) == 0
    assert slots.ranks[:, QKV, 1].tolist() == [4, 4]
    assert slots.ranks[:, O_PROJ, 1].tolist() == [0, 0]
    assert slots.ranks[:, QKV, 0].tolist() == [8, 8] and slots.ranks[:, O_PROJ, 0].tolist() == [8, 8]
    # Which fused launches a step needs: b alone needs only q/k/v; with a also o_proj; none without slots.
    assert slots.active_groups([1]) == [[True, False, False, False]] * 2
    assert slots.active_groups([0, 1]) == [[True, True, False, False]] * 2
    assert slots.active_groups([]) == [[False] * 4] * 2
    # a's slot reused by d (o/up only): nothing of a's q/k/v may remain.
    cache.release(a)
    assert acquire_now(cache, d) == 0
    assert torch.count_nonzero(slots.a["q_proj"][:, 0]) == 0
    assert torch.count_nonzero(slots.b["k_proj"][:, 0]) == 0
    assert torch.count_nonzero(slots.a["o_proj"][:, 0]) > 0
    assert slots.ranks[:, QKV, 0].tolist() == [0, 0]
    assert slots.ranks[:, GATE_UP, 0].tolist() == [8, 8] and slots.ranks[:, DOWN, 0].tolist() == [0, 0]
    assert slots.active_groups([0]) == [[False, True, True, False]] * 2
    assert slots.scales[0] == pytest.approx(2.0)


def test_release_without_acquire_and_disabled_lora(adapter_dirs: dict[str, Path]) -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match="not acquired"):
        cache.release(lora(adapter_dirs, "a"))
    disabled = make_cache(max_loras=0)
    with pytest.raises(AdapterLoadError, match="max_loras=0"):
        disabled.acquire(lora(adapter_dirs, "a"))


@pytest.mark.gpu
def test_cuda_slot_copy_is_pinned_asynchronous_and_exact(adapter_dirs: dict[str, Path]) -> None:
    from engine.lora_slots import pin_adapter

    device = torch.device("cuda")
    slots = LoRASlots(MODEL, 2, 8, torch.bfloat16, device)

    def read(folder: str, expected_hash: str | None, clock=None):
        return load_adapter(folder, MODEL, 8, torch.bfloat16, expected_hash, clock=clock)

    cache = AdapterCache(slots, read, 3)
    a = lora(adapter_dirs, "a")
    deadline = time.monotonic() + 60
    while (slot := cache.acquire(a)) is None:  # loading, then copying on the side stream
        assert time.monotonic() < deadline
        cache.wait_for_loads(timeout=1)
        time.sleep(0.001)
    expected = read(str(adapter_dirs["a"]), None)
    # Read straight into one page-locked buffer (pinning again is a no-op); an adapter read unpinned is
    # copied once into one pinned buffer, its views rebuilt on it.
    assert (
        expected.a["q_proj"].is_pinned() and expected.b["o_proj"].is_pinned() and expected.ranks.is_pinned()
    )
    assert pin_adapter(expected).a["q_proj"].data_ptr() == expected.a["q_proj"].data_ptr()
    unpinned = load_adapter(str(adapter_dirs["a"]), MODEL, 8, torch.bfloat16, pin=False)
    repinned = pin_adapter(unpinned)
    views = (*repinned.a.values(), *repinned.b.values(), repinned.ranks)
    assert all(t.is_pinned() for t in views)
    assert len({t.untyped_storage().data_ptr() for t in views}) == 1
    assert torch.equal(repinned.a["q_proj"], expected.a["q_proj"]) and torch.equal(
        repinned.ranks, expected.ranks
    )
    # Handed out only after the copy completed: the default stream sees the full contents.
    assert torch.equal(slots.a["q_proj"][:, slot].cpu(), expected.a["q_proj"])
    assert torch.equal(slots.b["o_proj"][:, slot].cpu(), expected.b["o_proj"])
    assert torch.count_nonzero(slots.a["gate_proj"][:, slot]) == 0
    assert slots.ranks[:, QKV, slot].tolist() == [8, 8]


def test_random_workload_never_serves_wrong_or_shared_weights(adapter_dirs: dict[str, Path]) -> None:
    """Property check over a seeded random mix of acquire / release / evict: a slot handed out always
    holds exactly that adapter's weights, and two pinned adapters never share a slot (sharing would give
    one tenant's tokens another tenant's weights)."""
    import random

    rng = random.Random(1234)
    cache = make_cache(max_loras=2, max_cpu=3)
    names = sorted(adapter_dirs)
    reqs = {n: lora(adapter_dirs, n) for n in names}
    expected = {n: load_adapter(adapter_dirs[n], MODEL, 8) for n in names}
    pins: dict[str, list[int]] = {n: [] for n in names}  # slots handed out and not yet released
    served = 0
    for _ in range(400):
        name = rng.choice(names)
        op = rng.random()
        if op < 0.55:
            slot = acquire_now(cache, reqs[name])
            if slot is None:
                continue
            served += 1
            pins[name].append(slot)
            q = cache.slots.a["q_proj"][:, slot]
            if "q_proj" in expected[name].a:
                r = expected[name].a["q_proj"].shape[1]
                assert torch.equal(q[:, :r], expected[name].a["q_proj"])
            else:
                assert torch.count_nonzero(q) == 0
            assert cache.slots.ranks[:, :, slot].tolist() == expected[name].ranks.tolist()
        elif op < 0.9 and pins[name]:
            pins[name].pop()
            cache.release(reqs[name])
        else:
            cache.evict(str(reqs[name].content_hash))
        owners: dict[int, str] = {}
        for n, held in pins.items():
            for slot in held:
                assert owners.setdefault(slot, n) == n, f"slot {slot} pinned by {owners[slot]} and {n}"
        assert cache.stats()["pinned"] == sum(1 for held in pins.values() if held)
    assert served > 50


def test_request_without_path_needs_a_loader(adapter_dirs: dict[str, Path]) -> None:
    """The app passes content hashes only; offline, with no loader, that is a clear load error."""
    a = lora(adapter_dirs, "a")
    by_hash = LoRARequest("a", content_hash=a.content_hash)
    cache = make_cache()
    assert cache.acquire(by_hash) is None
    cache.wait_for_loads(timeout=30)
    with pytest.raises(AdapterLoadError, match="no lora_path"):
        cache.acquire(by_hash)
    # With a loader that resolves hashes to folders (what the app's S3-backed loader does) it loads.
    folders = {a.content_hash: str(adapter_dirs["a"])}
    resolving = make_cache(loader=lambda req: folders[req.content_hash])
    assert acquire_now(resolving, by_hash) == 0


def test_evict_from_another_thread_is_safe(adapter_dirs: dict[str, Path]) -> None:
    """The app deletes adapters from its own thread while the engine thread acquires and releases."""
    cache = make_cache(max_loras=2, max_cpu=3)
    reqs = [lora(adapter_dirs, n) for n in "abc"]
    stop = threading.Event()
    errors: list[BaseException] = []

    jitter = random.Random(0)

    def evictor() -> None:
        try:
            while not stop.is_set():
                for r in reqs:
                    cache.evict(str(r.content_hash))
                # Random gaps: a fixed short period evicted every load before it finished on a loaded
                # 2-core CI machine, so nothing was ever served; gaps up to 20 ms let some loads land.
                time.sleep(jitter.uniform(0.0, 0.02))
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    thread = threading.Thread(target=evictor)
    thread.start()
    served = 0
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and served < 30:
            for r in reqs:
                slot = acquire_now(cache, r)
                if slot is not None:
                    served += 1
                    cache.release(r)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not errors
    assert served > 0
    assert cache.stats()["pinned"] == 0
    cache.evict(str(reqs[0].content_hash))
    assert acquire_now(cache, reqs[0]) is not None  # still usable afterwards


def test_a_slow_load_does_not_hold_up_another(adapter_dirs: dict[str, Path]) -> None:
    gate = threading.Event()
    a, b = lora(adapter_dirs, "a"), lora(adapter_dirs, "b")

    def loader(req: LoRARequest) -> str:
        if req.content_hash == a.content_hash:
            gate.wait(timeout=30)  # a's object store is slow
        return str(req.lora_path)

    cache = make_cache(loader=loader)
    try:
        assert cache.acquire(a) is None
        assert cache.acquire(b) is None
        deadline = time.monotonic() + 10
        while (slot := cache.acquire(b)) is None:
            assert time.monotonic() < deadline, "b waited behind a"
            time.sleep(0.005)
        assert slot == 0
        assert cache.acquire(a) is None  # still loading
    finally:
        gate.set()
    assert acquire_now(cache, a) == 1


def test_four_loads_run_at_once_by_default(adapter_dirs: dict[str, Path]) -> None:
    """A burst of cold adapters (a new tenant's traffic) loads in parallel, not two at a time."""
    gate = threading.Event()
    started: list[str] = []

    def loader(req: LoRARequest) -> str:
        started.append(req.lora_name)
        gate.wait(timeout=30)
        return str(req.lora_path)

    cache = make_cache(max_cpu=5, loader=loader)
    try:
        for name in "abcd":
            assert cache.acquire(lora(adapter_dirs, name)) is None
        deadline = time.monotonic() + 10
        while len(started) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sorted(started) == ["a", "b", "c", "d"]  # all four in flight before any finished
    finally:
        gate.set()
    cache.wait_for_loads(timeout=30)
    assert cache.stats()["loads"] == 4


def test_benchmark_stand_in_fetch_rewrites_the_same_bytes(tmp_path: Path) -> None:
    """The serving benchmark's loader deletes adapter files (LRU) and writes them again on demand: the
    rewrite must be byte-identical, or the cache's hash re-check would refuse it."""
    from benchmarks.serving_adapters import SeededAdapters

    files = SeededAdapters(tmp_path, MODEL, 4, ("q_proj", "v_proj"), "seeded", max_files=1)
    first, second = files.lora(0), files.lora(1)  # writing 1 deletes 0's file
    assert first.content_hash != second.content_hash
    assert not (files.folder(0) / "adapter_model.safetensors").exists()
    cache = make_cache(max_loras=1, max_cpu=1, loader=files.loader)
    assert acquire_now(cache, second) == 0
    cache.release(second)
    assert acquire_now(cache, first) == 0  # fetched again: rewritten, hash re-checked, loaded
    assert files.writes == 3 and cache.stats()["load_failures"] == 0
    rewritten = load_adapter(files.folder(0), MODEL, 8, torch.float32, first.content_hash)
    assert torch.equal(cache.slots.a["q_proj"][:, 0, :4], rewritten.a["q_proj"])
    assert torch.count_nonzero(rewritten.b["v_proj"]) > 0
