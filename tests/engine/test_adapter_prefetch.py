"""Issue 19 on the CPU: loads start when a request arrives (prefetch), finished loads go straight into a
free slot (never evicting one), every load leaves a per-stage record, admission never waits behind a
load a request does not need, and the loader processes with their reused staging blocks give the same
bytes as a load in the calling thread."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from engine.adapter_cache import AdapterCache
from engine.block_manager import BlockManager
from engine.demo import demo_config, write_adapter
from engine.load_stages import STAGES
from engine.lora import load_adapter
from engine.lora_slots import LoRASlots
from engine.model_loader import parse_config
from engine.request import LoRARequest, Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from tests.engine.sched_fakes import SlotTable

CFG = demo_config(512)
MODEL = parse_config(CFG)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    specs = {"a": (8, ["q_proj", "v_proj"]), "b": (4, ["o_proj", "down_proj"]), "c": (8, ["k_proj"])}
    return {
        name: write_adapter(root / name, CFG, r=r, lora_alpha=2 * r, target_modules=t, seed=i)
        for i, (name, (r, t)) in enumerate(specs.items())
    }


def make_cache(max_loras: int = 2, max_cpu: int = 4, loader=None) -> AdapterCache:
    slots = LoRASlots(MODEL, max_loras, 8, torch.float32, torch.device("cpu"))

    def read(folder: str, expected_hash: str | None, clock=None):
        return load_adapter(folder, MODEL, 8, torch.float32, expected_hash, clock=clock)

    return AdapterCache(slots, read, max_cpu, loader=loader)


def req(dirs: dict[str, Path], name: str) -> LoRARequest:
    return LoRARequest(name, str(dirs[name]))


def test_prefetch_loads_into_a_free_slot_before_anyone_acquires(dirs: dict[str, Path]) -> None:
    cache = make_cache()
    a = req(dirs, "a")
    cache.prefetch(a)
    cache.prefetch(a)  # a second arrival of the same adapter does not start a second load
    assert cache.stats()["prefetches"] == 1 and cache.has_pending_loads
    cache.wait_for_loads(timeout=30)
    assert cache.is_ready(a)
    assert cache.acquire(a) == 0  # the first acquire is a hit: no miss, no wait
    s = cache.stats()
    assert (s["misses"], s["loads"], s["hits"], s["cpu_hits"]) == (0, 1, 1, 0)
    cache.prefetch(a)  # resident: nothing to do
    assert cache.stats()["prefetches"] == 1


def test_every_load_leaves_a_record_of_its_stages(dirs: dict[str, Path]) -> None:
    cache = make_cache()
    a, b = req(dirs, "a"), req(dirs, "b")
    cache.prefetch(a)
    assert cache.acquire(b) is None  # a miss: loaded on the scheduler's ask, not prefetched
    cache.wait_for_loads(timeout=30)
    assert cache.acquire(b) is not None and cache.acquire(a) is not None
    records = {r.key: r for r in cache.load_records()}
    assert set(records) == {a.content_hash, b.content_hash}
    assert records[a.content_hash].prefetched and not records[b.content_hash].prefetched
    for record in records.values():
        in_thread = set(STAGES) - {"ipc"}  # no loader process here
        assert in_thread <= set(record.wall), record.wall
        assert all(seconds >= 0 for seconds in record.wall.values())
        # CPU time of the CPU-bound stages, from the loader thread's own clock
        assert record.cpu["parse"] > 0 and record.cpu["parse"] <= record.wall["parse"] + 1e-3
        assert record.submitted <= record.loaded <= record.slotted and record.total > 0


def test_a_finished_load_never_evicts_a_resident_adapter(dirs: dict[str, Path]) -> None:
    cache = make_cache(max_loras=1)
    a, b = req(dirs, "a"), req(dirs, "b")
    cache.prefetch(a)
    cache.wait_for_loads(timeout=30)
    assert cache.gpu_order() == [a.content_hash]  # the free slot took it
    cache.prefetch(b)
    cache.wait_for_loads(timeout=30)
    # No free slot: b waits in the CPU tier; a (unpinned, maybe about to be used) keeps its slot.
    assert cache.gpu_order() == [a.content_hash] and cache.cpu_order()[-1] == b.content_hash
    assert cache.is_ready(b)  # acquire can hand it a slot without a load
    assert cache.acquire(b) == 0 and cache.gpu_order() == [b.content_hash]


def test_prefetch_of_a_bad_adapter_is_reported_by_acquire(dirs: dict[str, Path], tmp_path: Path) -> None:
    from engine.adapter_cache import AdapterLoadError

    cache = make_cache()
    forged = LoRARequest("x", str(dirs["b"]), content_hash=req(dirs, "a").content_hash)
    cache.prefetch(forged)  # never raises
    cache.wait_for_loads(timeout=30)
    with pytest.raises(AdapterLoadError, match="does not match"):
        cache.acquire(forged)
    disabled = make_cache(max_loras=0, max_cpu=0)
    disabled.prefetch(req(dirs, "a"))  # adapters off: nothing to do, nothing raised
    assert not disabled.has_pending_loads


class LoadingSlots(SlotTable):
    """Slots where some adapters are still loading: acquire returns None for them."""

    def __init__(self, num_slots: int, loading: set[str]) -> None:
        super().__init__(num_slots)
        self.loading = loading
        self.asked: list[str] = []

    def acquire(self, lora: LoRARequest) -> int | None:
        self.asked.append(lora.key)
        if lora.key in self.loading:
            return None
        return super().acquire(lora)


def lora_of(name: str) -> LoRARequest:
    return LoRARequest(name, None, content_hash=name * 64)


def test_admission_never_waits_behind_a_load_it_does_not_need() -> None:
    slots = LoadingSlots(4, loading={"x" * 64})
    s = Scheduler(BlockManager(64, 4), slots, max_num_seqs=16, max_num_batched_tokens=256)
    params = SamplingParams(max_tokens=2)
    cold = [Request(f"cold{i}", [1, 2, 3, 4, 5], params, lora=lora_of("x")) for i in range(10)]
    warm = Request("warm", [1, 2, 3], params, lora=lora_of("y"))
    base = Request("base", [4, 5, 6], params)
    for r in [*cold, warm, base]:  # the resident-adapter and base requests queue behind ten cold ones
        s.add(r)
    out = s.schedule()
    assert [r.request_id for r, _ in out.scheduled] == ["warm", "base"]
    # One look at the loading adapter per step, not one per request and round-robin turn.
    assert slots.asked.count("x" * 64) == 1
    slots.loading.clear()  # loaded: the cold requests run next step, in arrival order
    out = s.schedule()
    ids = [r.request_id for r, _ in out.scheduled]
    assert ids == ["warm", "base", *[f"cold{i}" for i in range(10)]]  # running first, then admissions


def test_engine_starts_the_load_when_the_request_arrives(demo: Path, dirs: dict[str, Path]) -> None:
    from engine.config import EngineConfig
    from engine.demo import write_adapter as write
    from engine.engine import LLMEngine

    gate = threading.Event()
    asked: list[str] = []

    def loader(lora: LoRARequest) -> str:
        asked.append(lora.lora_name)
        gate.wait(timeout=30)
        return str(lora.lora_path)

    config = EngineConfig(model=str(demo), device="cpu", dtype="float32", max_loras=2, max_cpu_loras=4,
                          max_lora_rank=8, num_kv_blocks=64)  # fmt: skip
    engine = LLMEngine.from_config(config, adapter_loader=loader)
    try:
        model_cfg = json.loads((demo / "config.json").read_text())
        folder = write(
            demo.parent / "tenant-adapter", model_cfg, r=4, lora_alpha=8, target_modules=["q_proj"], seed=7
        )
        lora = LoRARequest("t", str(folder))
        engine.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0), lora=lora)
        # No step yet: the load is already on its way.
        assert engine.adapter_cache.has_pending_loads
        assert engine.adapter_cache.stats()["prefetches"] == 1
        gate.set()
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        assert outs[-1].finished and outs[-1].error is None and asked == ["t"]
        record = engine.adapter_cache.load_records()[0]
        assert record.prefetched and record.slotted > 0
    finally:
        engine.close()


@pytest.mark.slow
def test_loader_processes_give_the_same_adapter_and_reuse_their_block(dirs: dict[str, Path]) -> None:
    """Spawned processes (seconds to start on this CPU): one process, one staging block, three loads in
    turn; each result equals a load in this thread, and an earlier adapter is not overwritten by the
    next load through the same block."""
    from engine.adapter_process import LoaderProcessDied, ProcessLoader
    from engine.load_stages import StageClock

    far = ProcessLoader(MODEL, 8, torch.float32, processes=1, pin=False)
    try:
        got = {}
        for name in ("a", "b", "c"):
            clock = StageClock()
            got[name] = far(str(dirs[name]), None, clock).build()
            assert {"ipc", "read", "parse", "stack", "finite", "pin"} <= set(clock.wall)
        for name, adapter in got.items():
            here = load_adapter(dirs[name], MODEL, 8, torch.float32)
            assert adapter.content_hash == here.content_hash and adapter.scaling == here.scaling
            assert set(adapter.a) == set(here.a) and torch.equal(adapter.ranks, here.ranks)
            for m in here.a:
                assert torch.equal(adapter.a[m], here.a[m]) and torch.equal(adapter.b[m], here.b[m])
        with pytest.raises(Exception, match="does not match"):
            far(str(dirs["a"]), "0" * 64, StageClock())
        assert far(str(dirs["b"]), None, StageClock()).build().content_hash == got["b"].content_hash
        # Through the cache: the views are built when the finished load is collected, and the slot holds it.
        cache = AdapterCache(LoRASlots(MODEL, 2, 8, torch.float32, torch.device("cpu")), far, 4)
        c = req(dirs, "c")
        cache.prefetch(c)
        cache.wait_for_loads(timeout=60)
        slot = cache.acquire(c)
        assert slot is not None and torch.equal(cache.slots.a["k_proj"][:, slot], got["c"].a["k_proj"])
        assert "ipc" in cache.load_records()[0].wall
        far._children[0].proc.kill()  # a worker that dies is reported as such, not as a bad adapter
        far._children[0].proc.wait()
        with pytest.raises(LoaderProcessDied):
            far(str(dirs["a"]), None, StageClock())
    finally:
        far.close()
