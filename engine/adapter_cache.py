"""Adapter cache: device slots and a CPU tier, both LRU, with pinning of adapters in use.

  loader callback (disk / S3, in a background thread) -> read, hash, parse, stack (a loader process on
  CUDA hosts: engine/adapter_process.py) -> CPU tier (pinned memory on CUDA hosts)
  -> device slot (copied on a side stream on CUDA) -> used by the batch's tokens via their slot index.

A load starts when a request arrives (`prefetch`, called by the engine's add_request), not when the
scheduler first wants the adapter; a loaded adapter goes straight into a free slot if there is one. Every
load leaves a `LoadRecord` (engine/load_stages.py): its time per stage, from the ask to the slot copy.

Keys are content hashes (sha256 of the weights), never names. An adapter pinned by a running or
scheduled request is never evicted: its slot index is baked into that request's step tensors, so reusing
the slot would silently give one tenant's tokens another tenant's weights.
All bookkeeping is plain Python; tensors are only touched through `LoRASlots` and `load_adapter`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

from engine.load_stages import LoadRecord, StageClock
from engine.lora import LoRAAdapter
from engine.lora_slots import LoRASlots, pin_adapter
from engine.pinned_pool import Extent, PinnedPool
from engine.request import LoRARequest

AdapterLoader = Callable[[LoRARequest], str]
# (folder, expected sha256, the load's stage clock) -> the adapter in CPU memory, or an object whose
# build() makes it (a loader process's StagedBuffer: views built in the engine's thread, see there)
# (folder, expected_hash, clock) -> adapter; with a pinned pool also a 4th argument, out(nbytes) -> buffer
ReadAdapter = Callable[..., Any]
log = logging.getLogger(__name__)
# Finished loads kept for stats() and the benchmark's per-stage table.
_LOG_SIZE = 4096


class AdapterLoadError(RuntimeError):
    """Loading an adapter failed (missing, unreadable, wrong hash, does not fit the model)."""


def path_loader(lora: LoRARequest) -> str:
    """The offline default: the adapter is already a local folder."""
    if lora.lora_path is None:
        raise AdapterLoadError(f"adapter {lora.lora_name!r} has no lora_path and no loader was given")
    return lora.lora_path


@dataclass(slots=True)
class _Resident:
    slot: int
    refs: int = 0
    event: Any = None  # the slot copy (LoRASlots.write); None once known complete
    draining: bool = False  # evicted while pinned: freed at the last release, never handed out again
    record: LoadRecord | None = None  # the load this slot copy finishes, timed when the copy is seen done


class AdapterCache:
    def __init__(
        self,
        slots: LoRASlots,
        load: ReadAdapter,
        max_cpu_loras: int,
        loader: AdapterLoader | None = None,
        failure_ttl: float = 2.0,
        load_workers: int = 4,
        on_close: Callable[[], None] | None = None,
        pool: PinnedPool | None = None,
        eager_slots: bool = False,
    ) -> None:
        """`slots`: device storage (its num_slots = max_loras); `load(folder, expected_hash, clock)` reads
        one adapter into CPU tensors; `loader` maps a request to a local folder (default: its lora_path).
        A failed load is reported to every acquire for `failure_ttl` seconds, then retried. Loads of
        different adapters run on `load_workers` threads, so one slow fetch does not hold up the others;
        a load spends most of its time in I/O, sha256 and memmove, which let go of the GIL, so a few
        threads overlap well (a burst of cold adapters is the case that matters). `pool`: the CPU tier's
        pinned memory, allocated once (every load stacks into a run of it; `read` then takes a fourth
        argument, `out(nbytes) -> uint8 tensor`). `eager_slots`: a finished load that was prefetched (a
        request waits for it) takes the least recently used unpinned slot when none is free, so its copy is
        done before the scheduler asks, instead of at that ask."""
        self.slots = slots
        self._read = load
        self._loader = loader or path_loader
        self._max_cpu = max_cpu_loras
        self._lock = threading.RLock()
        self._gpu: OrderedDict[str, _Resident] = OrderedDict()  # LRU first
        self._free = list(range(slots.num_slots))
        self._cpu: OrderedDict[str, LoRAAdapter] = OrderedDict()  # LRU first
        self._loading: dict[str, Future[tuple[Any, float, Extent | None]]] = {}
        self._done: queue.SimpleQueue[str] = queue.SimpleQueue()  # keys whose load future finished
        self._records: dict[str, LoadRecord] = {}  # loads asked for and not yet in a slot
        self._log: deque[LoadRecord] = deque(maxlen=_LOG_SIZE)
        self._on_close = on_close
        self._arena = pool
        self._extents: dict[str, Extent] = {}  # CPU-tier adapter -> its run of the pool
        self._eager = eager_slots
        self._failed: dict[str, tuple[str, float]] = {}  # key -> (message, first report time or -1)
        self._failure_ttl = failure_ttl
        self._discard: set[str] = set()  # evicted while loading
        self._pool = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="lora-load")
        self._stats = dict.fromkeys(
            (
                "hits",
                "cpu_hits",
                "misses",
                "prefetches",
                "loads",
                "load_failures",
                "load_seconds",
                "gpu_evictions",
                "cpu_evictions",
                "pool_misses",
            ),
            0.0,
        )

    @classmethod
    def for_model(cls, config: Any, loaded: Any, loader: AdapterLoader | None = None) -> AdapterCache:
        """From an EngineConfig and a LoadedModel (see engine/adapter_setup.py)."""
        from engine.adapter_setup import cache_for_model

        return cache_for_model(config, loaded, loader)

    # -- the scheduler's side -------------------------------------------------------------------------

    def acquire(self, lora: LoRARequest) -> int | None:
        """Slot of `lora`, pinned (refcount + 1); None while it loads or every slot is pinned.

        A slot whose copy is still on its way is handed out at once: the device's compute stream is made
        to wait for the copy (LoRASlots.order_after), so the request runs this step, not one step later.

        Never blocks on I/O. Raises AdapterLoadError when its background load failed (to every caller
        until `failure_ttl` seconds after the first report; the next acquire after that loads again)."""
        key = _key(lora)
        with self._lock:
            if self.slots.num_slots == 0:
                raise AdapterLoadError("LoRA adapters are disabled on this engine (max_loras=0)")
            self._collect()
            resident = self._gpu.get(key)
            if resident is not None:
                if resident.draining:
                    return None
                self._use(resident)
                resident.refs += 1
                self._gpu.move_to_end(key)
                self._stats["hits"] += 1
                return resident.slot
            if key in self._failed:
                message, when = self._failed[key]
                # Reported at least once, then to every acquire within the TTL; retried after it.
                if when < 0:
                    self._failed[key] = (message, time.monotonic())
                    raise AdapterLoadError(message)
                if time.monotonic() - when < self._failure_ttl:
                    raise AdapterLoadError(message)
                del self._failed[key]
            adapter = self._cpu.get(key)
            if adapter is None:
                if key not in self._loading:
                    self._stats["misses"] += 1
                    self._submit(key, lora, prefetched=False)
                return None
            slot = self._take_slot()
            if slot is None:
                return None
            resident = self._to_slot(key, adapter, slot)
            self._stats["cpu_hits"] += 1
            self._use(resident)
            resident.refs += 1
            return slot

    def prefetch(self, lora: LoRARequest) -> None:
        """Start loading `lora` now, in the background, if it is in neither tier nor on its way (the
        engine calls this when a request arrives, so the load overlaps the request's wait in the queue).
        Never blocks, never raises for a bad adapter: the scheduler's acquire reports that."""
        key = _key(lora)
        with self._lock:
            if self.slots.num_slots == 0:
                return
            self._collect()
            if key in self._gpu or key in self._cpu or key in self._loading or key in self._failed:
                return
            self._stats["prefetches"] += 1
            self._submit(key, lora, prefetched=True)

    def is_ready(self, lora: LoRARequest) -> bool:
        """Could acquire hand out a slot for `lora` without waiting for a load? (A hint for admission:
        resident in a slot whose copy is done, or in the CPU tier; acquire itself still decides.)"""
        key = _key(lora)
        with self._lock:
            self._collect()
            resident = self._gpu.get(key)
            if resident is not None:
                return not resident.draining
            return key in self._cpu or key in self._failed

    def release(self, lora: LoRARequest) -> None:
        """Unpin (refcount - 1). The slot stays cached for the next request (LRU)."""
        key = _key(lora)
        with self._lock:
            resident = self._gpu.get(key)
            if resident is None or resident.refs <= 0:
                raise ValueError(f"release of adapter {lora.lora_name!r} that is not acquired")
            resident.refs -= 1
            if resident.refs == 0 and resident.draining:
                self._drop_gpu(key)

    def evict(self, content_hash: str) -> None:
        """Forget an adapter in both tiers (e.g. it was deleted); a pinned one goes at its last release."""
        with self._lock:
            self._drop_cpu(content_hash)
            self._failed.pop(content_hash, None)
            if content_hash in self._loading:
                self._discard.add(content_hash)
            resident = self._gpu.get(content_hash)
            if resident is None:
                return
            if resident.refs == 0:
                self._drop_gpu(content_hash)
            else:
                resident.draining = True

    # -- introspection ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        with self._lock:
            self._collect()
            for resident in self._gpu.values():
                self._copied(resident)  # times the slot copies that finished since the last look
            out = dict(self._stats)
            if self._arena is not None:
                out.update(
                    pool_misses=float(self._arena.misses), pool_free_blocks=float(self._arena.free_blocks)
                )
            out.update(
                gpu_resident=float(len(self._gpu)),
                cpu_resident=float(len(self._cpu)),
                loading=float(len(self._loading)),
                pinned=float(sum(1 for r in self._gpu.values() if r.refs > 0)),
                slots=float(self.slots.num_slots),
            )
            return out

    def load_records(self) -> list[LoadRecord]:
        """The latest finished loads (up to 4,096), oldest first: per-stage times of each, from the ask
        to the adapter in the CPU tier, and to its first slot copy once that is done."""
        with self._lock:
            self._collect()
            return list(self._log)

    def gpu_order(self) -> list[str]:
        """Device-resident content hashes, least recently used first."""
        with self._lock:
            self._collect()
            return list(self._gpu)

    def cpu_order(self) -> list[str]:
        with self._lock:
            self._collect()
            return list(self._cpu)

    @property
    def has_pending_loads(self) -> bool:
        with self._lock:
            return bool(self._loading) or any(not self._copied(r) for r in self._gpu.values())

    def wait_for_loads(self, timeout: float | None = None) -> None:
        """Block until the background loads and slot copies running now finish (the engine's idle wait,
        so it does not spin while an adapter it needs is on its way; and tests)."""
        with self._lock:
            pending = list(self._loading.values())
            copies = [r.event for r in self._gpu.values() if r.event is not None]
        wait_futures(pending, timeout=timeout)
        for event in copies:
            event.synchronize()  # a slot copy is a short memcpy on the side stream

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._on_close is not None:
            self._on_close()

    # -- internals ----------------------------------------------------------------------------------------

    def _submit(self, key: str, lora: LoRARequest, prefetched: bool) -> None:
        record = LoadRecord(key, time.monotonic(), prefetched=prefetched)
        self._records[key] = record
        future = self._pool.submit(self._load, lora, record)
        self._loading[key] = future
        future.add_done_callback(lambda _: self._done.put(key))

    def _load(self, lora: LoRARequest, record: LoadRecord) -> tuple[Any, float, Extent | None]:
        """Runs in the loader thread: fetch, then read, verify the hash, parse, stack (in a loader process
        when there is one), pin (a no-op for an adapter that is pinned already). Writes only `record`,
        which nobody reads before the future is done."""
        start = time.perf_counter()
        record.wall["queue"] = time.monotonic() - record.submitted
        clock = StageClock()
        folder = self._loader(lora)
        clock.lap("fetch")
        taken: list[Extent] = []
        arena = self._arena
        if arena is None:
            adapter = self._read(folder, lora.content_hash, clock)
        else:

            def out(nbytes: int) -> Any:
                extent, buffer = arena.buffer(nbytes)
                taken.extend([extent] if extent is not None else [])
                return buffer

            try:
                adapter = self._read(folder, lora.content_hash, clock, out)
            except BaseException:
                for extent in taken:  # a bad adapter gives its run back
                    arena.give(extent)
                raise
        if isinstance(adapter, LoRAAdapter):
            adapter = pin_adapter(adapter)
            clock.lap("pin")
        for name, seconds in clock.wall.items():
            record.wall[name] = record.wall.get(name, 0.0) + seconds
        record.cpu.update(clock.cpu)
        record.loaded = time.monotonic()
        return adapter, time.perf_counter() - start, taken[0] if taken else None

    def _collect(self) -> None:
        """Move finished background loads into the CPU tier (or record their failure); a loaded adapter
        goes into a free slot at once, so its first acquire finds the copy done."""
        while True:
            try:
                key = self._done.get_nowait()
            except queue.Empty:
                return
            future = self._loading.pop(key, None)
            record = self._records.pop(key, None)
            if future is None:
                continue
            extent = None
            try:
                adapter, seconds, extent = future.result()
                if key not in self._discard and not isinstance(adapter, LoRAAdapter):
                    adapter = adapter.build()
            except Exception as exc:
                self._give(extent)  # a bad adapter's run goes back to the pool
                if key in self._discard:
                    self._discard.discard(key)
                    continue
                self._stats["load_failures"] += 1
                self._failed[key] = (f"adapter {key[:12]} could not be loaded: {exc}", -1.0)
                continue
            if key in self._discard:  # evicted while it loaded
                self._discard.discard(key)
                self._give(extent)
                continue
            self._stats["loads"] += 1
            self._stats["load_seconds"] += seconds
            self._cpu[key] = adapter
            if extent is not None:
                self._extents[key] = extent
            if record is not None:
                self._log.append(record)
            while len(self._cpu) > self._max_cpu:
                self._drop_cpu(next(iter(self._cpu)))
                self._stats["cpu_evictions"] += 1
            slot = None
            if key in self._cpu and key not in self._gpu:
                prefetched = record is not None and record.prefetched
                slot = self._take_slot() if self._eager and prefetched else self._take_free()
            if slot is not None:
                self._to_slot(key, adapter, slot, record)
            elif record is not None:
                self._records[key] = record  # timed at its first slot copy

    def _to_slot(
        self, key: str, adapter: LoRAAdapter, slot: int, record: LoadRecord | None = None
    ) -> _Resident:
        """Start the copy of a CPU-tier adapter into `slot` (refcount 0: acquire pins it)."""
        self._cpu.move_to_end(key)
        record = record or self._records.pop(key, None)
        if record is not None:
            record.wall["ready"] = time.monotonic() - record.loaded  # loaded -> its slot copy starts
        resident = _Resident(slot=slot, event=self.slots.write(slot, adapter), record=record)
        self._gpu[key] = resident
        return resident

    def _use(self, resident: _Resident) -> None:
        """About to hand out this slot: if its copy may still run, order the device's work after it."""
        if not self._copied(resident):
            self.slots.order_after(resident.event)

    def _copied(self, resident: _Resident) -> bool:
        event = resident.event
        if event is not None and not event.query():
            return False
        resident.event = None
        record, resident.record = resident.record, None
        if record is not None:
            record.slotted = time.monotonic()
            seconds = event.seconds() if event is not None else 0.0
            record.wall["copy"] = seconds
            record.cpu["copy"] = 0.0
        return True

    def _take_free(self) -> int | None:
        return self._free.pop(0) if self._free else None

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop(0)
        for key, resident in self._gpu.items():  # least recently used first
            if resident.refs == 0 and not resident.draining:
                slot = resident.slot
                del self._gpu[key]
                self._stats["gpu_evictions"] += 1
                return slot
        return None

    def _drop_cpu(self, key: str) -> None:
        """Forget a CPU-tier adapter; its run of the pool comes back once the slot copies from it ran."""
        if self._cpu.pop(key, None) is not None:
            self._give(self._extents.pop(key, None), self.slots.fence())

    def _give(self, extent: Extent | None, fence: Any = None) -> None:
        if extent is not None and self._arena is not None:
            self._arena.give(extent, fence)

    def _drop_gpu(self, key: str) -> None:
        resident = self._gpu.pop(key)
        self._free.append(resident.slot)
        self._free.sort()


def _key(lora: LoRARequest) -> str:
    if lora.content_hash is None:
        raise ValueError(f"adapter {lora.lora_name!r} has no content hash")
    return lora.content_hash
