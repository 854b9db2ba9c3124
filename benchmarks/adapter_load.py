"""Adapter loading on the CPU: disk -> (pinned) CPU tensors, phase by phase.

One Llama-3-8B-shaped adapter (32 layers, hidden 4096, rank 16 on q/k/v/o, bf16: 27 MB) written by the
serving benchmark's stand-in fetch, then loaded the way a loader thread of the adapter cache loads it
(one reused read buffer per thread). Prints:
- each phase of `load_adapter` on its own: read, sha256, parse, validate, alloc (the adapter's buffer:
  pinned on a CUDA host, where it comes back warm from torch's host cache; pageable here, where its
  first touch faults every page in), stack (copies into it), finite (the NaN/Inf pass);
- `load_adapter` end to end, where sha256 runs on a second thread beside parse..finite;
- the stand-in fetch (a deleted file written again), which a cold adapter pays first in serving.py;
- an engine-like step loop in the main thread (Python, then a GIL-free wait standing for the GPU) while
  loads run on other threads: a load that holds the GIL stretches the steps.

    python -m benchmarks.adapter_load [--repeat 9] [--keep 8] [--workers 1]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving_adapters import QKVO, SeededAdapters
from benchmarks.serving_model import LLAMA3_8B
from engine import lora as L
from engine.adapter_file import parse_safetensors, read_bounded
from engine.model_loader import ModelConfig, parse_config

RANK = 16


class _NoDigest:
    """Stands in for load_adapter's hash thread, so "read" and "sha256" are timed apart."""

    def feed(self, chunk: Any) -> None:
        pass


def phases(folder: Path, cfg: ModelConfig, dtype: torch.dtype, buffer: L.ReadBuffer) -> tuple[dict, Any]:
    """Seconds of each phase of `load_adapter`, run one after the other (no overlap)."""
    out: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[name] = now - t
        t = now

    raw = L.read_adapter_config(folder)
    spec = L.check_adapter_config(raw, RANK, cfg.num_layers)
    shapes = L.module_shapes(cfg)
    limit = 4 * cfg.num_layers * RANK * sum(i + o for i, o in shapes.values()) + (1 << 20)
    data = read_bounded(folder / L.WEIGHTS_FILE, limit, RANK, buffer, _NoDigest())  # type: ignore[arg-type]
    lap("read")
    hashlib.sha256(data).hexdigest()
    lap("sha256")
    tensors = parse_safetensors(data)
    lap("parse")
    found = L._pair_tensors(tensors, spec, cfg.num_layers)
    scaling, per_module = L._check_and_scale(found, spec, shapes, RANK)
    lap("validate")
    pin = torch.cuda.is_available()
    nbytes = L._layout(per_module, shapes, cfg.num_layers, dtype)[2]
    out_buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    if not pin:  # pageable memory faults its pages in on first write: count that here, not in "stack"
        ctypes.memset(out_buffer.data_ptr(), 0, nbytes)
    lap("alloc")
    adapter, values = L._stack(scaling, per_module, shapes, cfg.num_layers, dtype, out_buffer)
    lap("stack")
    L._refuse_non_finite(values, adapter)
    lap("finite")
    return out, adapter


def python_work(iterations: int) -> None:
    for _ in range(iterations):
        sum(range(100))


def calibrate(ms: float) -> int:
    """Iterations of `python_work` that take about `ms` milliseconds here with nothing else running."""
    start = time.perf_counter()
    python_work(1000)
    return max(1, round(ms / 1e3 / (time.perf_counter() - start) * 1000))


def step_loop(
    load: Callable[[], Any], loads: int, workers: int, work: int, wait_s: float
) -> tuple[list[float], list[float]]:
    """Run `loads` calls of `load` on `workers` threads while this thread runs engine-like steps: a fixed
    amount of Python (`work` iterations), then a GIL-free wait (`wait_s`, the GPU's part of a step).
    Returns (step seconds, load seconds)."""
    todo = iter(range(loads))
    lock = threading.Lock()
    load_times: list[float] = []

    def worker() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            start = time.perf_counter()
            load()
            load_times.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for th in threads:
        th.start()
    steps = []
    while any(th.is_alive() for th in threads):
        start = time.perf_counter()
        python_work(work)
        time.sleep(wait_s)
        steps.append(time.perf_counter() - start)
    return steps, load_times


def summary(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    return (
        f"mean {statistics.fmean(ordered) * 1e3:5.1f}, p99 {p99 * 1e3:5.1f}, max {ordered[-1] * 1e3:5.1f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--keep", type=int, default=8, help="adapters kept alive, like the CPU tier")
    parser.add_argument("--workers", type=int, default=1, help="loader threads during the step loop")
    parser.add_argument("--python-ms", type=float, default=2.0, help="Python per step of the step loop")
    parser.add_argument("--wait-ms", type=float, default=8.0, help="GIL-free wait per step (the GPU's part)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loraplex-adapter-load-") as root:
        run(args, Path(root))


def run(args: argparse.Namespace, root: Path) -> None:
    cfg, dtype = parse_config(LLAMA3_8B), torch.bfloat16
    files = SeededAdapters(root, cfg, RANK, QKVO, "qkvo", max_files=args.repeat + 1)
    requests = [files.lora(i) for i in range(args.repeat + 1)]
    fetch = [files.rewrite(i) for i in range(min(5, len(requests)))]
    nbytes = (Path(requests[0].lora_path or "") / L.WEIGHTS_FILE).stat().st_size
    print(f"adapter: {nbytes / 1e6:.1f} MB file, rank {RANK} q/k/v/o, {cfg.num_layers} layers, -> {dtype}")
    print(f"torch threads {torch.get_num_threads()}; CUDA {torch.cuda.is_available()} (pinned buffers if so)")

    kept: deque[Any] = deque(maxlen=args.keep)  # as many adapters alive as a CPU tier would hold
    buffer = L.ReadBuffer()  # one per loader thread, as in AdapterCache.for_model
    runs = []
    for req in requests[:1] + requests:  # the first run warms the page cache and the buffers
        phase_times, adapter = phases(Path(req.lora_path or ""), cfg, dtype, buffer)
        kept.append(adapter)
        runs.append(phase_times)
    runs = runs[1:]
    print(f"\nphases one after the other, median of {len(runs)}:")
    for name in runs[0]:
        print(f"  {name:9s} {statistics.median(r[name] for r in runs) * 1e3:6.1f} ms")
    print(f"  {'sum':9s} {statistics.median(sum(r.values()) for r in runs) * 1e3:6.1f} ms")

    ends = []
    for req in requests:
        start = time.perf_counter()
        kept.append(L.load_adapter(req.lora_path or "", cfg, RANK, dtype, req.content_hash, None, buffer))
        ends.append(time.perf_counter() - start)
    alloc = statistics.median(r["alloc"] for r in runs)
    print(
        f"\nload_adapter end to end: median {statistics.median(ends) * 1e3:.1f} ms, min {min(ends) * 1e3:.1f} ms"
        f" (with the first touch of a fresh pageable buffer; a warm pinned one has none: ~{alloc * 1e3:.0f} ms less)"
    )
    print(f"stand-in fetch (a deleted file written again): median {statistics.median(fetch) * 1e3:.1f} ms")
    kept.clear()

    loads = 3 * args.repeat
    cycle = iter(requests * loads)
    per_thread = threading.local()

    def one_load() -> None:
        req = next(cycle)
        if not hasattr(per_thread, "buffer"):
            per_thread.buffer = L.ReadBuffer()
        L.load_adapter(req.lora_path or "", cfg, RANK, dtype, req.content_hash, None, per_thread.buffer)

    blob = bytes(nbytes)
    work, wait = calibrate(args.python_ms), args.wait_ms / 1e3
    print(
        f"\nstep loop in the main thread ({args.python_ms:g} ms Python + {args.wait_ms:g} ms GIL-free wait per"
        f" step) while {args.workers} thread(s) run {loads} of:"
    )
    steps, times = step_loop(one_load, loads, args.workers, work, wait)
    print(f"  load_adapter           steps {summary(steps)}; loads {summary(times)}")
    steps, _ = step_loop(lambda: hashlib.sha256(blob).digest(), loads, args.workers, work, wait)
    print(f"  sha256 (CPU, no GIL)   steps {summary(steps)}")
    steps, _ = step_loop(lambda: time.sleep(0.03), loads, args.workers, work, wait)
    print(f"  sleep (no CPU/GIL)     steps {summary(steps)}")


if __name__ == "__main__":
    main()
