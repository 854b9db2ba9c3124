"""Adapter loads in worker processes, so that they never compete with the step loop for the GIL.

Issue 19 measured a 27 MB adapter at 24 ms on an idle engine and ~270 ms while the engine served: the
loader threads' parse and stack are hundreds of short Python and torch calls, and every one of them that
lets go of the GIL must win it back from the step loop (up to the 5 ms switch interval each), while the
step loop waits in turn whenever a loader holds it. Here the CPU part of a load (read, sha256, parse,
validate, stack, NaN/Inf check: `load_adapter`) runs in a worker process with an interpreter of its own,
writing the stacked bytes into its block of a shared staging mapping; the engine's loader thread only
waits for the answer (one wake-up), copies the block into a pinned CPU-tier buffer (one memmove, GIL
released), and the engine's thread builds the tensor views when it collects the load (`StagedBuffer`).

Workers are plain `python -m engine.adapter_process` children speaking one JSON line per job on their
stdin/stdout: unlike multiprocessing's spawn they never re-run the parent's main module, so a script that
builds an engine at top level (no `if __name__ == "__main__"`) works, and nothing is unpickled. They never
touch CUDA and run torch on one thread, so loads run side by side instead of each taking every core.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import mmap
import os
import queue
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import IO, Any

import torch

from engine.adapter_file import AdapterError, ReadBuffer
from engine.load_stages import StageClock
from engine.lora import LoRAAdapter, load_adapter, module_shapes, stacked_sizes, stacked_views
from engine.model_loader import ModelConfig
from engine.ops import LORA_MODULES


def stacked_nbytes(module_rank: dict[str, int], model_cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the stacked buffer of an adapter with these module ranks (`stacked_layout`)."""
    return stacked_sizes(module_rank, module_shapes(model_cfg), model_cfg.num_layers, dtype)[1]


def max_adapter_bytes(model_cfg: ModelConfig, max_rank: int, dtype: torch.dtype) -> int:
    """The largest stacked adapter this model admits: every module at max_rank."""
    return stacked_nbytes(dict.fromkeys(LORA_MODULES, max_rank), model_cfg, dtype)


def adapter_on_buffer(
    buffer: torch.Tensor,
    module_rank: dict[str, int],
    model_cfg: ModelConfig,
    dtype: torch.dtype,
    scaling: float,
    content_hash: str,
) -> LoRAAdapter:
    """An adapter whose stacked bytes (as `load_adapter` lays them out) were copied into `buffer`, e.g.
    from a loader process's staging block: views only, nothing read or checked again."""
    a, b, ranks = stacked_views(buffer, module_rank, module_shapes(model_cfg), model_cfg.num_layers, dtype)
    return LoRAAdapter(content_hash, max(module_rank.values()), scaling, a, b, ranks)


def stacked_layout(adapter: LoRAAdapter) -> dict[str, int]:
    """Module -> rank of an adapter's stacked buffer, in layout order (what `adapter_on_buffer` needs)."""
    return {m: adapter.a[m].shape[1] for m in adapter.a}


class LoaderProcessDied(RuntimeError):
    """A loader process exited or answered garbage (not: the adapter was bad)."""


@dataclass(frozen=True, slots=True)
class Staged:
    """What a loader process answers: the layout of the bytes it left in its staging block."""

    content_hash: str
    scaling: float
    layout: dict[str, int]  # module -> rank, in buffer order
    nbytes: int
    wall: dict[str, float]
    cpu: dict[str, float]


@dataclass(frozen=True, slots=True)
class StagedBuffer:
    """A loaded adapter's bytes in its pinned CPU-tier buffer, views not built yet. The H200 run of
    2026-12-03 showed the loader thread's last stage at 65 ms wall for 24 ms of CPU: the few dozen
    tensor-view calls each handed the GIL back to the step loop and waited to win it again. So the views
    are built by `build()` where the GIL is held anyway (AdapterCache._collect, in the engine's thread)."""

    buffer: torch.Tensor
    staged: Staged
    cfg: ModelConfig
    dtype: torch.dtype

    def build(self) -> LoRAAdapter:
        s = self.staged
        return adapter_on_buffer(self.buffer, s.layout, self.cfg, self.dtype, s.scaling, s.content_hash)


@dataclass(slots=True)
class _Child:
    proc: subprocess.Popen[str]
    offset: int  # its staging block


class ProcessLoader:
    """`load(folder, expected_hash, clock) -> StagedBuffer` for AdapterCache, in `processes` workers,
    each with its own block of one shared staging file."""

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
        setup = {
            "path": self._path,
            "size": size,
            "cfg": dataclasses.asdict(cfg),
            "max_rank": max_rank,
            "dtype": str(dtype).removeprefix("torch."),
        }
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._children: list[_Child] = []
        self._idle: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        try:
            for i in range(processes):
                proc = subprocess.Popen(
                    [sys.executable, "-m", "engine.adapter_process", json.dumps(setup)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                self._children.append(_Child(proc, i * self.block_bytes))
            for child in self._children:  # all start at once; each says "ready" once torch is imported
                if _read_line(child.proc) != {"ready": True}:
                    raise LoaderProcessDied("a loader process did not start")
                self._idle.put(child)
        except BaseException:
            self.close()
            raise

    def __call__(
        self, folder: str, expected_hash: str | None, clock: StageClock, out: Any = None
    ) -> StagedBuffer:
        """`out(nbytes)`: the CPU-tier buffer to copy the staged bytes into (a run of the pinned pool);
        None: a fresh (pinned) allocation."""
        child = self._idle.get()  # as many children as loader threads: never waits
        try:
            job = {"folder": folder, "hash": expected_hash, "offset": child.offset, "block": self.block_bytes}
            assert child.proc.stdin is not None
            try:
                child.proc.stdin.write(json.dumps(job) + "\n")
                child.proc.stdin.flush()
            except OSError as exc:
                raise LoaderProcessDied(f"loader process gone: {exc}") from exc
            answer = _read_line(child.proc)
            if "error" in answer:
                kind = AdapterError if answer.get("kind") == "AdapterError" else RuntimeError
                raise kind(answer["error"])
            staged = Staged(**answer)
            clock.lap("ipc")
            clock.merge(staged.wall, staged.cpu)
            clock.wall["ipc"] -= sum(staged.wall.values())  # the round trip's own cost
            if out is not None:
                buffer = out(staged.nbytes)
            else:
                buffer = torch.empty(staged.nbytes, dtype=torch.uint8, pin_memory=self.pin)
            ctypes.memmove(buffer.data_ptr(), self._view.data_ptr() + child.offset, staged.nbytes)
        finally:
            self._idle.put(child)
        clock.lap("pin")
        return StagedBuffer(buffer, staged, self.cfg, self.dtype)

    def close(self) -> None:
        for child in self._children:
            with contextlib.suppress(OSError):
                if child.proc.stdin is not None:
                    child.proc.stdin.close()  # end of input: the child exits
        for child in self._children:
            try:
                child.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.proc.kill()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


def _read_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise LoaderProcessDied(f"loader process exited (code {proc.poll()})")
    try:
        answer = json.loads(line)
    except ValueError as exc:
        raise LoaderProcessDied(f"loader process answered {line[:80]!r}") from exc
    if not isinstance(answer, dict):
        raise LoaderProcessDied(f"loader process answered {line[:80]!r}")
    return answer


def _staging_file(size: int) -> str:
    """A file of `size` bytes for the shared mapping: in /dev/shm when it has the room (memory, never
    written back to a disk), else in the temp folder."""
    shm = "/dev/shm"
    folder = shm if os.path.isdir(shm) and shutil.disk_usage(shm).free > 2 * size else None
    fd, path = tempfile.mkstemp(prefix="loraplex-staging-", dir=folder)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


def _serve(setup: dict[str, Any], jobs: IO[str], answers: IO[str]) -> None:
    """The worker's loop: one JSON job per line in, one JSON answer per line out, until end of input."""
    torch.set_num_threads(1)
    cfg = ModelConfig(**setup["cfg"])
    dtype = getattr(torch, setup["dtype"])
    with open(setup["path"], "r+b") as f:
        mapping = mmap.mmap(f.fileno(), setup["size"])
    view = torch.frombuffer(mapping, dtype=torch.uint8)
    read_buffer = ReadBuffer()
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in jobs:
        job = json.loads(line)
        clock = StageClock()
        offset, block = job["offset"], job["block"]

        def out(nbytes: int, offset: int = offset, block: int = block) -> torch.Tensor:
            if nbytes > block:  # cannot happen: blocks are sized for every module at max_rank
                raise AdapterError(f"adapter of {nbytes} bytes does not fit a staging block of {block}")
            return view[offset : offset + nbytes]

        try:
            adapter = load_adapter(
                job["folder"], cfg, setup["max_rank"], dtype, job["hash"], False, read_buffer, clock, out
            )
            layout = stacked_layout(adapter)
            answer: dict[str, Any] = dataclasses.asdict(
                Staged(
                    adapter.content_hash,
                    adapter.scaling,
                    layout,
                    stacked_nbytes(layout, cfg, dtype),
                    clock.wall,
                    clock.cpu,
                )
            )
        except Exception as exc:  # a bad adapter (or unreadable file): reported, the worker goes on
            answer = {"error": str(exc) or type(exc).__name__, "kind": type(exc).__name__}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    # stdout carries the answers alone: anything else printed (warnings, library chatter) goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _serve(json.loads(sys.argv[1]), sys.stdin, answers)
