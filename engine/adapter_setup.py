"""Building an AdapterCache for a model from the engine's settings (issue 19's switches live here).

On CUDA hosts (or when config.adapter_load_processes says so) the CPU part of a load runs in loader
processes; the CPU tier's pinned memory is one pool allocated here, at start (engine/pinned_pool.py);
slot copies are batched (LoRASlots(batched=True)); a finished prefetched load takes an unpinned slot.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from engine.adapter_cache import AdapterCache, AdapterLoader
from engine.adapter_file import ReadBuffer
from engine.config import EngineConfig
from engine.load_stages import StageClock
from engine.lora import LoRAAdapter, load_adapter
from engine.lora_slots import LoRASlots
from engine.pinned_pool import PinnedPool

log = logging.getLogger(__name__)
# Blocks of the pinned pool: an adapter takes a run of them, so a small adapter does not hold a block
# sized for the largest one (rank 16 over q/k/v/o of a Llama-3-8B is 27 MB, over all seven 84 MB).
POOL_BLOCK_BYTES = 2 << 20
# The automatic pool's ceiling: the H200 runs of 2026-12-03 used 16 GiB (~580 rank-16 q/k/v/o adapters of
# a Llama-3-8B); a CPU tier bigger than this falls back to fresh pinned buffers for what does not fit.
POOL_MAX_AUTO_MB = 16 << 10


def auto_pool_mb(max_cpu_loras: int, largest_bytes: int, host_bytes: int) -> int:
    """The pool for `adapter_pinned_pool_mb=None` on CUDA: room for the whole CPU tier of the largest
    adapter, rounded up to a power of two MiB (torch's pinned allocator pins a power of two anyway), at most
    POOL_MAX_AUTO_MB and a quarter of the host's memory (both rounded down to a power of two)."""
    need = max(1, -(-max_cpu_loras * largest_bytes // (1 << 20)))
    cap = min(POOL_MAX_AUTO_MB, max(1, host_bytes // 4 >> 20))
    return min(1 << (need - 1).bit_length(), 1 << (cap.bit_length() - 1))


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def default_load_processes(cuda: bool) -> int:
    """8 on CUDA hosts, at most half the cores; 0 (threads only) elsewhere.

    From the H200 run of 2026-12-03: a process holds a load for read + parse + stack + finite + ipc + pin,
    ~30 ms idle and ~90 ms with the page cache dropped (read 67 ms). At 32 req/s the first seconds of a
    cold Zipf run bring a new adapter with nearly every request: 32 x 0.09 = ~3 busy on average, and
    with 4 the Poisson bursts queued loads for 162 ms (median). 8 keeps that queue near zero at twice
    the rate, each process one torch thread, so they leave the engine's thread its core."""
    if not cuda:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def cache_for_model(
    config: EngineConfig, loaded: Any, loader: AdapterLoader | None = None, slots: LoRASlots | None = None
) -> AdapterCache:
    """slots: made by the caller (tensor parallel: each rank's part, engine/parallel/slots.py)."""
    cuda = loaded.device.type == "cuda"
    batched = config.adapter_batched_copy
    if slots is None:
        slots = LoRASlots(
            loaded.config, config.max_loras, config.max_lora_rank, loaded.dtype, loaded.device, batched
        )
    pin = cuda  # page-locked only where an async device copy needs it
    per_thread = threading.local()  # each loader thread reuses its own read buffer

    def read_here(folder: str, expected_hash: str | None, clock: StageClock, out: Any = None) -> LoRAAdapter:
        if not hasattr(per_thread, "buffer"):
            per_thread.buffer = ReadBuffer()
        return load_adapter(
            folder, loaded.config, config.max_lora_rank, loaded.dtype, expected_hash, pin, per_thread.buffer,
            clock, out,
        )  # fmt: skip

    processes = config.adapter_load_processes
    if processes is None:
        processes = default_load_processes(cuda)
    workers = processes or 4
    pool = None
    mb = config.adapter_pinned_pool_mb
    if config.max_loras and (mb or (mb is None and cuda)):
        from engine.adapter_process import max_adapter_bytes

        largest = max_adapter_bytes(loaded.config, config.max_lora_rank, loaded.dtype)
        if mb is None:
            mb = auto_pool_mb(config.max_cpu_loras, largest, host_memory_bytes())
        block = min(POOL_BLOCK_BYTES, -(-largest // 4096) * 4096)
        pool = PinnedPool(mb << 20, block, pin) if mb << 20 >= block else None
        if pool is not None:
            log.info("adapter CPU tier: a pinned pool of %d MiB in %d blocks", mb, pool.blocks)
    eager = config.adapter_eager_slots
    common: dict[str, Any] = {"load_workers": workers, "pool": pool, "eager_slots": eager}
    if not processes or config.max_loras == 0:
        return AdapterCache(slots, read_here, config.max_cpu_loras, loader, **common)
    from engine.adapter_process import LoaderProcessDied, ProcessLoader

    try:
        far = ProcessLoader(loaded.config, config.max_lora_rank, loaded.dtype, processes, pin)
    except (OSError, LoaderProcessDied):
        log.exception("adapter loader processes did not start; loading in threads")
        return AdapterCache(slots, read_here, config.max_cpu_loras, loader, **common)
    broken = threading.Event()

    def read(folder: str, expected_hash: str | None, clock: StageClock, out: Any = None) -> Any:
        if not broken.is_set():
            try:
                return far(folder, expected_hash, clock, out)
            except LoaderProcessDied:  # e.g. killed: this load and the later ones run in threads
                log.exception("an adapter loader process died; loading in threads from now on")
                broken.set()
        return read_here(folder, expected_hash, clock, out)

    return AdapterCache(slots, read, config.max_cpu_loras, loader, on_close=far.close, **common)
