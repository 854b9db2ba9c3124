"""The CPU tier's pinned memory, allocated once at start and reused (issue 19).

The H200 run of 2026-12-03 measured ~24 ms of CPU for the fresh pinned allocation every cold load made
(cudaHostAlloc pins new pages and serialises in the driver), on the serving path. Here one arena is
pinned when the engine starts (torch's own pinned allocation, which page-locks a request rounded up to a
power of two: size the pool as one), cut into fixed-size blocks; an adapter takes a run of
consecutive blocks (its stacked buffer is one contiguous allocation: A/B views and one host -> device
copy), and the CPU tier gives the run back when it drops the adapter.

A run given back may still be the source of a slot copy on the side stream: it comes back with a fence
(a CUDA event recorded after that copy) and is handed out again only once the fence has passed.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of `count` blocks starting at block `start`."""

    start: int
    count: int


class PinnedPool:
    def __init__(self, total_bytes: int, block_bytes: int, pin: bool) -> None:
        """`total_bytes` rounded down to whole blocks of `block_bytes`; `pin`: page-lock the arena (CUDA)."""
        if block_bytes <= 0 or total_bytes < block_bytes:
            raise ValueError(f"pool of {total_bytes} bytes in blocks of {block_bytes}")
        self.block_bytes = block_bytes
        self.blocks = total_bytes // block_bytes
        self.pinned = pin
        self.arena = torch.empty(self.blocks * block_bytes, dtype=torch.uint8, pin_memory=pin)
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.blocks)]  # (start, count), sorted, merged
        self._fenced: list[tuple[Any, Extent]] = []  # given back while a copy from it may still run
        self.misses = 0  # takes that found no room (the caller allocates on its own)

    def take(self, nbytes: int) -> Extent | None:
        """A run of blocks holding `nbytes`, or None when no run is free (first fit, lowest address)."""
        need = max(1, -(-nbytes // self.block_bytes))
        with self._lock:
            self._reap(wait=False)
            extent = self._fit(need)
            if extent is None and self._fenced:
                self._reap(wait=True)  # copies from those runs were queued long ago: a short wait
                extent = self._fit(need)
            if extent is None:
                self.misses += 1
            return extent

    def buffer(self, nbytes: int) -> tuple[Extent | None, torch.Tensor]:
        """A run and its first `nbytes`; when the pool is full, (None, a fresh allocation) instead."""
        extent = self.take(nbytes)
        if extent is None:
            return None, torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        return extent, self.tensor(extent, nbytes)

    def tensor(self, extent: Extent, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of the run, as uint8."""
        if nbytes > extent.count * self.block_bytes:
            raise ValueError(f"{nbytes} bytes do not fit a run of {extent.count} blocks")
        start = extent.start * self.block_bytes
        return self.arena[start : start + nbytes]

    def give(self, extent: Extent, fence: Any = None) -> None:
        """Return a run; `fence` (an event with query/synchronize): reuse it only after that passed."""
        with self._lock:
            if fence is None:
                self._release(extent)
            else:
                self._fenced.append((fence, extent))

    @property
    def free_blocks(self) -> int:
        with self._lock:
            self._reap(wait=False)
            return sum(count for _, count in self._free)

    def _fit(self, need: int) -> Extent | None:
        for i, (start, count) in enumerate(self._free):
            if count >= need:
                if count == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, count - need)
                return Extent(start, need)
        return None

    def _reap(self, wait: bool) -> None:
        keep = []
        for fence, extent in self._fenced:
            if wait:
                fence.synchronize()
            if wait or fence.query():
                self._release(extent)
            else:
                keep.append((fence, extent))
        self._fenced = keep

    def _release(self, extent: Extent) -> None:
        """Insert the run back, merged with free neighbours (so large runs form again)."""
        start, count = extent.start, extent.count
        i = bisect.bisect_left(self._free, (start, 0))
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] > start:
            raise ValueError(f"run {extent} given back twice")
        if i < len(self._free) and start + count > self._free[i][0]:
            raise ValueError(f"run {extent} given back twice")
        if i < len(self._free) and start + count == self._free[i][0]:
            count += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            start, count = self._free[i - 1][0], self._free[i - 1][1] + count
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (start, count))
