"""Issue 19, second round, on the CPU: the CPU tier's pinned pool (exact reuse of runs, nothing leaked on
eviction, failure or discard), batched slot copies (slot contents equal the per-tensor path for adapters
of different ranks and targets, one after another in the same slots), and eager slots for prefetched
loads (a finished load takes an unpinned slot, never a pinned one)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.adapter_cache import AdapterCache, AdapterLoadError
from engine.adapter_setup import POOL_MAX_AUTO_MB, auto_pool_mb
from engine.demo import demo_config, write_adapter
from engine.lora import LoRAAdapter, load_adapter, module_shapes
from engine.lora_slots import LoRASlots
from engine.model_loader import parse_config
from engine.ops import LORA_MODULES, MODULE_GROUPS
from engine.pinned_pool import Extent, PinnedPool
from engine.request import LoRARequest

CFG = demo_config(512)
MODEL = parse_config(CFG)
BLOCK = 4096
# The CPU tier is page-locked on a CUDA host (pin_adapter copies anything else out of the pool).
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "a": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        "b": (4, ["q_proj", "v_proj"]),
        "c": (2, ["gate_proj", "down_proj"]),
        "d": (8, list(LORA_MODULES)),
    }
    out = {
        name: write_adapter(root / name, CFG, r=r, lora_alpha=2 * r, target_modules=t, seed=i)
        for i, (name, (r, t)) in enumerate(specs.items())
    }
    bad = write_adapter(root / "nan", CFG, r=4, lora_alpha=8, target_modules=["q_proj"], seed=9)
    from safetensors.torch import load_file, save_file

    weights = load_file(bad / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first][0, 0] = float("nan")
    save_file(weights, bad / "adapter_model.safetensors")
    out["nan"] = bad
    return out


class Fence:
    def __init__(self) -> None:
        self.done = False
        self.waited = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited += 1
        self.done = True


def test_pool_hands_out_runs_and_reuses_them_exactly() -> None:
    pool = PinnedPool(10 * BLOCK, BLOCK, pin=False)
    first = pool.take(3 * BLOCK)
    second = pool.take(BLOCK + 1)  # rounds up to two blocks
    assert (first, second) == (Extent(0, 3), Extent(3, 2)) and pool.free_blocks == 5
    assert pool.tensor(second, BLOCK + 1).data_ptr() == pool.arena.data_ptr() + 3 * BLOCK
    pool.give(first)
    assert pool.take(2 * BLOCK) == Extent(0, 2)  # first fit: the lowest run that holds it
    pool.give(Extent(0, 2))
    pool.give(second)  # merges with [0, 3) and [5, 10): one run of all ten again
    assert pool.take(10 * BLOCK) == Extent(0, 10) and pool.take(1) is None and pool.misses == 1
    pool.give(Extent(0, 10))
    with pytest.raises(ValueError, match="twice"):
        pool.give(Extent(4, 1))
    with pytest.raises(ValueError, match="do not fit"):
        pool.tensor(Extent(0, 1), BLOCK + 1)


def test_pool_reuses_a_fenced_run_only_after_its_fence() -> None:
    pool = PinnedPool(4 * BLOCK, BLOCK, pin=False)
    run = pool.take(4 * BLOCK)
    assert run is not None
    fence = Fence()
    pool.give(run, fence)
    assert pool.free_blocks == 0  # a copy from it may still run
    fence.done = True
    assert pool.free_blocks == 4
    run = pool.take(4 * BLOCK)
    fence = Fence()
    pool.give(run, fence)
    assert pool.take(BLOCK) == Extent(0, 1) and fence.waited == 1  # full: waits for the fence, then reuses
    extent, fallback = pool.buffer(4 * BLOCK)  # no room: a fresh allocation outside the arena
    assert extent is None and fallback.numel() == 4 * BLOCK and pool.misses == 1


def pooled_cache(pool: PinnedPool, max_loras: int = 2, max_cpu: int = 2, eager: bool = False) -> AdapterCache:
    slots = LoRASlots(MODEL, max_loras, 8, torch.float32, torch.device("cpu"), batched=True)

    def read(folder: str, expected_hash: str | None, clock=None, out=None):
        return load_adapter(folder, MODEL, 8, torch.float32, expected_hash, clock=clock, out_buffer=out)

    return AdapterCache(slots, read, max_cpu, pool=pool, eager_slots=eager)


def lora(dirs: dict[str, Path], name: str) -> LoRARequest:
    return LoRARequest(name, str(dirs[name]))


def loaded(cache: AdapterCache, req: LoRARequest) -> int | None:
    slot = cache.acquire(req)
    if slot is None:
        cache.wait_for_loads(timeout=30)
        slot = cache.acquire(req)
    return slot


def test_cpu_tier_lives_in_the_pool_and_gives_runs_back(dirs: dict[str, Path]) -> None:
    pool = PinnedPool(64 << 20, 1 << 20, pin=CUDA)
    cache = pooled_cache(pool, max_loras=1, max_cpu=2)
    try:
        total = pool.free_blocks
        a = lora(dirs, "a")
        assert loaded(cache, a) == 0
        held = total - pool.free_blocks
        assert held > 0
        adapter = cache._cpu[a.content_hash]
        low, high = pool.arena.data_ptr(), pool.arena.data_ptr() + pool.arena.numel()
        assert all(low <= t.data_ptr() < high for t in (*adapter.a.values(), *adapter.b.values()))
        here = load_adapter(dirs["a"], MODEL, 8, torch.float32)
        assert all(
            torch.equal(adapter.a[m], here.a[m]) and torch.equal(adapter.b[m], here.b[m]) for m in here.a
        )
        cache.release(a)
        for name in ("b", "c", "d"):  # the CPU tier holds 2: a and then b go, their runs come back
            req = lora(dirs, name)
            assert loaded(cache, req) == 0
            cache.release(req)
        kept = [cache._extents[k] for k in cache.cpu_order()]
        assert pool.free_blocks == total - sum(e.count for e in kept) and len(kept) == 2
        for key in cache.cpu_order():
            cache.evict(key)
        assert pool.free_blocks == total and not cache._extents
    finally:
        cache.close()


def test_a_bad_adapter_gives_its_run_back(dirs: dict[str, Path]) -> None:
    pool = PinnedPool(64 << 20, 1 << 20, pin=CUDA)
    cache = pooled_cache(pool)
    try:
        total = pool.free_blocks
        with pytest.raises(AdapterLoadError, match="NaN"):
            loaded(cache, lora(dirs, "nan"))  # fails after its bytes were stacked into the pool
        wrong = LoRARequest("wrong", str(dirs["b"]), content_hash="0" * 64)
        with pytest.raises(AdapterLoadError, match="does not match"):
            loaded(cache, wrong)
        assert pool.free_blocks == total
        c = lora(dirs, "c")
        cache.prefetch(c)
        cache.evict(c.content_hash)  # evicted while it loads: its run comes back when the load ends
        cache.wait_for_loads(timeout=30)
        cache.stats()
        assert pool.free_blocks == total and not cache._extents
    finally:
        cache.close()


def test_prefetched_load_takes_an_unpinned_slot_never_a_pinned_one(dirs: dict[str, Path]) -> None:
    for eager in (False, True):
        cache = pooled_cache(PinnedPool(64 << 20, 1 << 20, pin=CUDA), max_loras=2, max_cpu=4, eager=eager)
        try:
            a, b, c = lora(dirs, "a"), lora(dirs, "b"), lora(dirs, "c")
            assert loaded(cache, a) is not None and loaded(cache, b) is not None
            cache.release(b)  # a stays pinned (running), b is resident and unpinned
            cache.prefetch(c)
            cache.wait_for_loads(timeout=30)
            cache.stats()  # collects the finished load
            if eager:
                assert cache.gpu_order() == [a.content_hash, c.content_hash]
                assert cache.load_records()[-1].wall["ready"] < 1.0
            else:
                assert cache.gpu_order() == [a.content_hash, b.content_hash]
            assert cache.acquire(c) is not None  # from its slot, or from the CPU tier into b's
        finally:
            cache.close()


def random_adapter(gen: torch.Generator, rng: random.Random) -> LoRAAdapter:
    """An adapter whose tensors are views of one buffer, like load_adapter's, with random ranks <= 8."""
    from engine.adapter_process import adapter_on_buffer, stacked_nbytes

    layout = {m: rng.choice((1, 2, 4, 8)) for m in LORA_MODULES if rng.random() < 0.6} or {"q_proj": 3}
    nbytes = stacked_nbytes(layout, MODEL, torch.float32)
    offset = rng.choice((0, 64, 4096))  # somewhere inside a larger buffer, as in the pool
    buffer = torch.zeros(offset + nbytes + 128, dtype=torch.uint8)[offset : offset + nbytes]
    adapter = adapter_on_buffer(buffer, layout, MODEL, torch.float32, rng.uniform(0.5, 2.0), "h")
    for m in layout:
        adapter.a[m].copy_(torch.randn(adapter.a[m].shape, generator=gen))
        adapter.b[m].copy_(torch.randn(adapter.b[m].shape, generator=gen))
    group = {m: g for g, members in enumerate(MODULE_GROUPS) for m in members}
    adapter.ranks.zero_()
    for m, r in layout.items():
        adapter.ranks[:, group[m]] = torch.maximum(
            adapter.ranks[:, group[m]], torch.tensor(r, dtype=torch.int32)
        )
    return adapter


def test_batched_slot_copy_equals_the_per_tensor_path(dirs: dict[str, Path]) -> None:
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    batched = LoRASlots(MODEL, 3, 8, torch.float32, torch.device("cpu"), batched=True)
    plain = LoRASlots(MODEL, 3, 8, torch.float32, torch.device("cpu"))
    from_files = [load_adapter(d, MODEL, 8, torch.float32) for d in dirs.values() if d.name != "nan"]
    adapters = from_files + [random_adapter(gen, rng) for _ in range(24)]
    d_in, d_out = module_shapes(MODEL)["k_proj"]
    hand_built = LoRAAdapter(  # tensors on separate buffers: the batched path falls back to per-tensor
        "x", 2, 1.0, {"k_proj": torch.randn(MODEL.num_layers, 2, d_in, generator=gen)},
        {"k_proj": torch.randn(MODEL.num_layers, d_out, 2, generator=gen)},
        torch.tensor([[2] + [0] * (len(MODULE_GROUPS) - 1)] * MODEL.num_layers, dtype=torch.int32),
    )  # fmt: skip
    adapters.insert(7, hand_built)
    for i, adapter in enumerate(adapters):
        slot = rng.randrange(3) if i >= 3 else i
        assert batched.write(slot, adapter) is None and plain.write(slot, adapter) is None
        for module in plain.a:
            assert torch.equal(batched.a[module], plain.a[module]), (i, module)
            assert torch.equal(batched.b[module], plain.b[module]), (i, module)
        assert torch.equal(batched.ranks, plain.ranks) and torch.equal(batched.scales, plain.scales)
        assert torch.equal(batched.host_ranks, plain.host_ranks)
        # The batched path ran (it records each module's rank; the per-tensor fallback marks all dirty).
        expect = {m: adapter.a[m].shape[1] if m in adapter.a else 0 for m in plain.a}
        assert (batched._dirty[slot] == expect) == (adapter is not hand_built)


@pytest.mark.gpu
def test_cuda_pool_is_pinned_and_batched_copies_match(dirs: dict[str, Path]) -> None:
    """On the GPU: the arena is page-locked in place, loads land in it, and slots written by one
    host -> device copy per adapter on the side stream equal slots written per tensor, while CPU-tier
    evictions hand runs back behind the copies' fence."""
    device = torch.device("cuda")
    pool = PinnedPool(64 << 20, 1 << 20, pin=True)
    assert pool.pinned and pool.arena[:16].is_pinned()
    slots = LoRASlots(MODEL, 2, 8, torch.bfloat16, device, batched=True)
    plain = LoRASlots(MODEL, 2, 8, torch.bfloat16, device)

    def read(folder: str, expected_hash: str | None, clock=None, out=None):
        return load_adapter(
            folder, MODEL, 8, torch.bfloat16, expected_hash, True, clock=clock, out_buffer=out
        )

    cache = AdapterCache(slots, read, 2, pool=pool, eager_slots=True)
    try:
        for name in ("a", "d", "b", "c", "a"):
            req = lora(dirs, name)
            slot = loaded(cache, req)
            assert slot is not None
            torch.cuda.current_stream().synchronize()
            cache.wait_for_loads(timeout=30)
            plain.write(slot, read(str(dirs[name]), None)).synchronize()
            cache.release(req)
        for module in plain.a:
            assert torch.equal(slots.a[module], plain.a[module]) and torch.equal(
                slots.b[module], plain.b[module]
            )
        assert torch.equal(slots.ranks, plain.ranks) and torch.equal(slots.scales, plain.scales)
        assert cache.stats()["pool_misses"] == 0
    finally:
        cache.close()


def test_the_automatic_pool_holds_the_cpu_tier_within_its_caps() -> None:
    mib, gib = 1 << 20, 1 << 30
    # 8 adapters of 84 MB (rank 16, all seven modules of a Llama-3-8B): 672 MiB, rounded up to 1 GiB
    assert auto_pool_mb(8, 84 * mib, 128 * gib) == 1024
    assert auto_pool_mb(1, 1, 128 * gib) == 1  # never 0: a pool of one MiB
    # 512 of them would be 42 GiB: capped at 16 GiB, and at a quarter of a small host's memory
    assert auto_pool_mb(512, 84 * mib, 512 * gib) == POOL_MAX_AUTO_MB
    assert auto_pool_mb(512, 84 * mib, 24 * gib) == 4096  # a quarter of 24 GiB is 6 GiB: 4 GiB
