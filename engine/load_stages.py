"""Where an adapter load's time goes, stage by stage (issue 19): wall time and the thread's own CPU time.

A stage whose wall time is much longer than its CPU time waited: for the disk, for the GIL, for a free
worker. For the CPU-bound stages (parse, stack, finite) that gap is the GIL held by someone else, which
is how contention with the step loop shows up in the numbers without a profiler.
Plain Python, no torch: the adapter cache and the benchmark read these records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# In the order a load passes them. queue: submitted -> a loader thread starts it; fetch: the loader
# callback (S3 / disk cache); read .. finite: load_adapter; ipc: the round trip to a loader process minus
# the work it did; pin: the copy into the pinned CPU-tier buffer; ready: the load finished -> the first
# acquire that saw it; copy: the host -> device slot copy (issue -> its event seen complete).
STAGES = (
    "queue",
    "fetch",
    "read",
    "parse",
    "alloc",
    "stack",
    "finite",
    "hash_wait",
    "ipc",
    "pin",
    "ready",
    "copy",
)


class StageClock:
    """Laps of wall and thread CPU time; `lap(name)` closes the stage running since the previous lap."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t = time.perf_counter()
        self._c = time.thread_time()

    def lap(self, name: str) -> None:
        t, c = time.perf_counter(), time.thread_time()
        self.wall[name] = self.wall.get(name, 0.0) + t - self._t
        self.cpu[name] = self.cpu.get(name, 0.0) + c - self._c
        self._t, self._c = t, c

    def merge(self, wall: dict[str, float], cpu: dict[str, float]) -> None:
        """Add stages timed elsewhere (a loader process)."""
        for name, seconds in wall.items():
            self.wall[name] = self.wall.get(name, 0.0) + seconds
        for name, seconds in cpu.items():
            self.cpu[name] = self.cpu.get(name, 0.0) + seconds


@dataclass(slots=True)
class LoadRecord:
    """One adapter's load, from the request that asked for it to its slot copy."""

    key: str
    submitted: float  # time.monotonic() when the load was asked for (prefetch or acquire)
    loaded: float = 0.0  # monotonic time the adapter reached the CPU tier
    slotted: float = 0.0  # monotonic time its first slot copy was seen complete
    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    prefetched: bool = False  # asked for at add_request, before the scheduler wanted it

    @property
    def total(self) -> float:
        """Seconds from the ask to the adapter usable in a slot (0 while not there yet)."""
        return self.slotted - self.submitted if self.slotted else 0.0
