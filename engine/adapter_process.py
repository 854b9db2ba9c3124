"""Adapter loads in worker processes, so that they never compete with the step loop for the GIL.

Issue 19 measured a 27 MB adapter at 24 ms on an idle engine and ~270 ms while the engine served: the
loader threads' parse and stack are hundreds of short Python and torch calls, and every one of them that
lets go of the GIL must win it back from the step loop (up to the 5 ms switch interval each), while the
step loop waits in turn whenever a loader holds it. Here the CPU part of a load (read, sha256, parse,
validate, stack, NaN/Inf check: `load_adapter`) runs in a spawned process with an interpreter of its own,
writing the stacked bytes into a block of a shared staging mapping; the engine's loader thread only waits
for the result (one wake-up), copies the block into a pinned CPU-tier buffer (one memmove, GIL released)
and rebuilds the tensor views (a few dozen calls). The staging blocks are reused, one per loader thread.

The child processes never touch CUDA and run torch on one thread: loads run side by side, not each
spreading over every core.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import os
import queue
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from engine.adapter_file import AdapterError, ReadBuffer
from engine.load_stages import StageClock
from engine.lora import (
    LoRAAdapter,
    adapter_on_buffer,
    load_adapter,
    max_adapter_bytes,
    stacked_layout,
    stacked_nbytes,
)
from engine.model_loader import ModelConfig


@dataclass(frozen=True, slots=True)
class Staged:
    """What a loader process hands back: the layout of the bytes it left in its staging block."""

    content_hash: str
    scaling: float
    layout: dict[str, int]  # module -> rank, in buffer order
    nbytes: int
    wall: dict[str, float]
    cpu: dict[str, float]


class _Worker:
    """A loader process's own state (set once by the pool's initializer): the staging mapping and the
    reused read buffer. One per process; the parent never builds one."""

    mapping: mmap.mmap | None = None
    view: torch.Tensor | None = None
    buffer: ReadBuffer | None = None


def _init_worker(path: str, size: int) -> None:
    torch.set_num_threads(1)
    with open(path, "r+b") as f:
        _Worker.mapping = mmap.mmap(f.fileno(), size)
    _Worker.view = torch.frombuffer(_Worker.mapping, dtype=torch.uint8)
    _Worker.buffer = ReadBuffer()


def _ping(_: int) -> int:
    return os.getpid()


def _stage(
    folder: str,
    cfg: ModelConfig,
    max_rank: int,
    dtype: torch.dtype,
    expected_hash: str | None,
    offset: int,
    block_bytes: int,
) -> Staged:
    """In the loader process: load_adapter, stacking into this call's staging block."""
    assert _Worker.view is not None and _Worker.buffer is not None
    view = _Worker.view
    clock = StageClock()

    def out(nbytes: int) -> torch.Tensor:
        if nbytes > block_bytes:  # cannot happen: blocks are sized for every module at max_rank
            raise AdapterError(f"adapter of {nbytes} bytes does not fit a staging block of {block_bytes}")
        return view[offset : offset + nbytes]

    adapter = load_adapter(folder, cfg, max_rank, dtype, expected_hash, False, _Worker.buffer, clock, out)
    layout = stacked_layout(adapter)
    nbytes = stacked_nbytes(layout, cfg, dtype)
    return Staged(adapter.content_hash, adapter.scaling, layout, nbytes, clock.wall, clock.cpu)


@dataclass(frozen=True, slots=True)
class StagedBuffer:
    """A loaded adapter's bytes in its pinned CPU-tier buffer, views not built yet. The first run (H200,
    2026-12-03) showed the loader thread's last stage at 65 ms wall for 24 ms of CPU: the few dozen
    tensor-view calls each handed the GIL back to the step loop and waited to win it again. So the views
    are built by `build()` where the GIL is held anyway (AdapterCache._collect, in the engine's thread)."""

    buffer: torch.Tensor
    staged: Staged
    cfg: ModelConfig
    dtype: torch.dtype

    def build(self) -> LoRAAdapter:
        s = self.staged
        return adapter_on_buffer(self.buffer, s.layout, self.cfg, self.dtype, s.scaling, s.content_hash)


class ProcessLoader:
    """`load(folder, expected_hash, clock)` for AdapterCache, done in `processes` worker processes; it
    returns a `StagedBuffer` (AdapterCache builds the adapter from it)."""

    def __init__(
        self, cfg: ModelConfig, max_rank: int, dtype: torch.dtype, processes: int, pin: bool
    ) -> None:
        self.cfg, self.max_rank, self.dtype, self.pin = cfg, max_rank, dtype, pin
        self.block_bytes = -(-max_adapter_bytes(cfg, max_rank, dtype) // 4096) * 4096
        size = self.block_bytes * processes
        self._path = _staging_file(size)
        with open(self._path, "r+b") as f:
            self._mapping = mmap.mmap(f.fileno(), size)
        self._view = torch.frombuffer(self._mapping, dtype=torch.uint8)
        self._blocks: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(processes):
            self._blocks.put(i)
        self._pool = ProcessPoolExecutor(
            processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self._path, size),
        )
        # Start every process now (interpreter + torch import: seconds), not at the first cold adapter.
        list(self._pool.map(_ping, range(processes)))

    def __call__(self, folder: str, expected_hash: str | None, clock: StageClock) -> StagedBuffer:
        block = self._blocks.get()  # one block per loader thread: never waits
        try:
            offset = block * self.block_bytes
            future = self._pool.submit(
                _stage, folder, self.cfg, self.max_rank, self.dtype, expected_hash, offset, self.block_bytes
            )
            staged = future.result()
            clock.lap("ipc")
            clock.merge(staged.wall, staged.cpu)
            clock.wall["ipc"] -= sum(staged.wall.values())  # the round trip's own cost
            buffer = torch.empty(staged.nbytes, dtype=torch.uint8, pin_memory=self.pin)
            ctypes.memmove(buffer.data_ptr(), self._view.data_ptr() + offset, staged.nbytes)
        finally:
            self._blocks.put(block)
        clock.lap("pin")
        return StagedBuffer(buffer, staged, self.cfg, self.dtype)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


def _staging_file(size: int) -> str:
    """A file of `size` bytes for the shared mapping: in /dev/shm when it has the room (memory, never
    written back to a disk), else in the temp folder."""
    folder = (
        "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * size else None
    )
    fd, path = tempfile.mkstemp(prefix="loraplex-staging-", dir=folder)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path
