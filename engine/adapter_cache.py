"""Adapter cache: device slots and a CPU tier, both LRU, with pinning of adapters in use.

  loader callback (disk / S3, in a background thread) -> CPU tier (pinned memory on CUDA hosts)
  -> device slot (copied on a side stream on CUDA) -> used by the batch's tokens via their slot index.

Keys are content hashes (sha256 of the weights), never names. An adapter pinned by a running or
scheduled request is never evicted: its slot index is baked into that request's step tensors, so reusing
the slot would silently give one tenant's tokens another tenant's weights.
All bookkeeping is plain Python; tensors are only touched through `LoRASlots` and `load_adapter`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

from engine.adapter_file import ReadBuffer
from engine.lora import LoRAAdapter, load_adapter
from engine.lora_slots import LoRASlots, pin_adapter
from engine.request import LoRARequest

AdapterLoader = Callable[[LoRARequest], str]


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
    event: Any = None  # CUDA event of the slot copy; None once known complete
    draining: bool = False  # evicted while pinned: freed at the last release, never handed out again


class AdapterCache:
    def __init__(
        self,
        slots: LoRASlots,
        load: Callable[[str, str | None], LoRAAdapter],
        max_cpu_loras: int,
        loader: AdapterLoader | None = None,
        failure_ttl: float = 2.0,
        load_workers: int = 4,
    ) -> None:
        """`slots`: device storage (its num_slots = max_loras); `load(folder, expected_hash)` reads one
        adapter into CPU tensors; `loader` maps a request to a local folder (default: its lora_path).
        A failed load is reported to every acquire for `failure_ttl` seconds, then retried. Loads of
        different adapters run on `load_workers` threads, so one slow fetch does not hold up the others;
        a load spends most of its time in I/O, sha256 and memmove, which let go of the GIL, so a few
        threads overlap well (a burst of cold adapters is the case that matters)."""
        self.slots = slots
        self._read = load
        self._loader = loader or path_loader
        self._max_cpu = max_cpu_loras
        self._lock = threading.RLock()
        self._gpu: OrderedDict[str, _Resident] = OrderedDict()  # LRU first
        self._free = list(range(slots.num_slots))
        self._cpu: OrderedDict[str, LoRAAdapter] = OrderedDict()  # LRU first
        self._loading: dict[str, Future[tuple[LoRAAdapter, float]]] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # key -> (message, first report time or -1)
        self._failure_ttl = failure_ttl
        self._discard: set[str] = set()  # evicted while loading
        self._pool = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="lora-load")
        self._stats = dict.fromkeys(
            (
                "hits",
                "cpu_hits",
                "misses",
                "loads",
                "load_failures",
                "load_seconds",
                "gpu_evictions",
                "cpu_evictions",
            ),
            0.0,
        )

    @classmethod
    def for_model(cls, config: Any, loaded: Any, loader: AdapterLoader | None = None) -> AdapterCache:
        """From an EngineConfig and a LoadedModel (see engine/model_loader.py)."""
        slots = LoRASlots(loaded.config, config.max_loras, config.max_lora_rank, loaded.dtype, loaded.device)

        pin = loaded.device.type == "cuda"  # page-locked only where an async device copy needs it
        per_thread = threading.local()  # each loader thread reuses its own read buffer

        def read(folder: str, expected_hash: str | None) -> LoRAAdapter:
            if not hasattr(per_thread, "buffer"):
                per_thread.buffer = ReadBuffer()
            return load_adapter(
                folder,
                loaded.config,
                config.max_lora_rank,
                loaded.dtype,
                expected_hash,
                pin,
                per_thread.buffer,
            )

        return cls(slots, read, config.max_cpu_loras, loader)

    # -- the scheduler's side -------------------------------------------------------------------------

    def acquire(self, lora: LoRARequest) -> int | None:
        """Slot of `lora`, pinned (refcount + 1); None while it loads or every slot is pinned.

        Never blocks on I/O. Raises AdapterLoadError when its background load failed (to every caller
        until `failure_ttl` seconds after the first report; the next acquire after that loads again)."""
        key = _key(lora)
        with self._lock:
            if self.slots.num_slots == 0:
                raise AdapterLoadError("LoRA adapters are disabled on this engine (max_loras=0)")
            self._collect()
            resident = self._gpu.get(key)
            if resident is not None:
                if resident.draining or not _copied(resident):
                    return None
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
                    self._loading[key] = self._pool.submit(self._load, lora)
                return None
            slot = self._take_slot()
            if slot is None:
                return None
            self._cpu.move_to_end(key)
            resident = _Resident(slot=slot, event=self.slots.write(slot, adapter))
            self._gpu[key] = resident
            self._stats["cpu_hits"] += 1
            if not _copied(resident):
                return None
            resident.refs += 1
            return slot

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
            self._cpu.pop(content_hash, None)
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
            out = dict(self._stats)
            out.update(
                gpu_resident=float(len(self._gpu)),
                cpu_resident=float(len(self._cpu)),
                loading=float(len(self._loading)),
                pinned=float(sum(1 for r in self._gpu.values() if r.refs > 0)),
                slots=float(self.slots.num_slots),
            )
            return out

    def gpu_order(self) -> list[str]:
        """Device-resident content hashes, least recently used first."""
        with self._lock:
            return list(self._gpu)

    def cpu_order(self) -> list[str]:
        with self._lock:
            self._collect()
            return list(self._cpu)

    @property
    def has_pending_loads(self) -> bool:
        with self._lock:
            return bool(self._loading) or any(not _copied(r) for r in self._gpu.values())

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

    # -- internals ----------------------------------------------------------------------------------------

    def _load(self, lora: LoRARequest) -> tuple[LoRAAdapter, float]:
        """Runs in the loader thread: fetch, verify the hash, parse, pin (a no-op for an adapter that
        `load_adapter` read into pinned memory already). Touches no shared state."""
        start = time.perf_counter()
        folder = self._loader(lora)
        adapter = pin_adapter(self._read(folder, lora.content_hash))
        return adapter, time.perf_counter() - start

    def _collect(self) -> None:
        """Move finished background loads into the CPU tier (or record their failure)."""
        for key, future in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[key]
            if key in self._discard:
                self._discard.discard(key)
                continue
            try:
                adapter, seconds = future.result()
            except Exception as exc:
                self._stats["load_failures"] += 1
                self._failed[key] = (f"adapter {key[:12]} could not be loaded: {exc}", -1.0)
                continue
            self._stats["loads"] += 1
            self._stats["load_seconds"] += seconds
            self._cpu[key] = adapter
            while len(self._cpu) > self._max_cpu:
                self._cpu.popitem(last=False)
                self._stats["cpu_evictions"] += 1

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

    def _drop_gpu(self, key: str) -> None:
        resident = self._gpu.pop(key)
        self._free.append(resident.slot)
        self._free.sort()


def _key(lora: LoRARequest) -> str:
    if lora.content_hash is None:
        raise ValueError(f"adapter {lora.lora_name!r} has no content hash")
    return lora.content_hash


def _copied(resident: _Resident) -> bool:
    if resident.event is not None and not resident.event.query():
        return False
    resident.event = None
    return True
