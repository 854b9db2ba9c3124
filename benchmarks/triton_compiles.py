"""Which Triton kernels compile (or load from the on-disk cache) while a benchmark runs, and for how long.

A kernel variant that the process has not launched before (a new specialization: an integer argument
that is 1 or divisible by 16 for the first time, a new constexpr) is compiled or loaded on the launching
thread, in the middle of a step. `CompileLog` counts those events through Triton's JIT hooks, so a slow
step can be matched with the compiles inside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompileLog:
    events: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end monotonic s, name)
    _open: dict[str, tuple[float, str]] = field(default_factory=dict)
    _saved: tuple[Any, Any] | None = None

    def __enter__(self) -> CompileLog:
        try:
            from triton import knobs
        except ImportError:  # no Triton (or too old for knobs): nothing to record
            return self
        self._saved = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
        knobs.runtime.jit_cache_hook = self._before
        knobs.runtime.jit_post_compile_hook = self._after
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            from triton import knobs

            knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._saved

    def _before(self, **kwargs: Any) -> bool:
        name = str(kwargs.get("repr", "?")).split("[", 1)[0]
        self._open[str(kwargs.get("key"))] = (time.monotonic(), name)
        return False  # compile as usual

    def _after(self, **kwargs: Any) -> bool:
        begun = self._open.pop(str(kwargs.get("key")), None)
        if begun is not None:
            self.events.append((begun[0], time.monotonic(), begun[1]))
        return False

    def between(self, start: float, end: float) -> list[tuple[float, float, str]]:
        return [e for e in self.events if e[0] < end and e[1] > start]

    def summary(self) -> dict[str, Any]:
        return {
            "count": len(self.events),
            "seconds": sum(b - a for a, b, _ in self.events),
            "kernels": sorted({name for *_, name in self.events}),
        }
