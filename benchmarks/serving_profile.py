"""Workload p (not in the default set): where a decode step's GPU time goes, kernel by kernel.

torch.profiler around graph-replayed decode steps at B=1 and B=32 without LoRA, and at workload b's
B=64 with 64 distinct q/k/v/o adapters (CUPTI reports the kernels inside a graph launch): per-step microseconds of each kernel name, largest first, and their sum against the
forward's CUDA-event time. Tells which kernels stand between a step and its roofline.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from benchmarks.serving_workloads import Bench, make_resident, start_decoding
from engine.request import LoRARequest


def _profile_decode(
    bench: Bench, batch: int, loras: list[LoRARequest] | None = None, steps: int = 10
) -> dict[str, Any]:
    engine = bench.engine
    ids = start_decoding(bench, batch, loras, bench.tag("prof"))
    for _ in range(3):
        engine.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if bench.cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        if bench.cuda:
            torch.cuda.synchronize()
    for rid in ids:
        engine.abort(rid)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:90]
            per_kernel[name][0] += event.device_time_total / steps
            per_kernel[name][1] += 1 / steps
    rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
    return {
        "batch": batch,
        "adapters": len(loras) if loras else 0,
        "kernel_us_per_step": sum(v[0] for v in per_kernel.values()),
        "launches_per_step": sum(v[1] for v in per_kernel.values()),
        "top": [{"kernel": k, "us_per_step": v[0], "launches_per_step": v[1]} for k, v in rows[:20]],
    }


def workload_p(bench: Bench) -> dict[str, Any]:
    sizes = sorted({1, min(32, bench.sizes.batch_sizes[-1])})
    profiles = [_profile_decode(bench, b) for b in sizes]
    b = bench.sizes.b_batch
    bench.qkvo.prepare(list(range(b)))
    loras = [bench.qkvo.lora(i) for i in range(b)]
    make_resident(bench, loras)
    profiles.append(_profile_decode(bench, b, loras))
    return {"profiles": profiles}


def report(p: dict[str, Any]) -> list[str]:
    lines = []
    for prof in p.get("profiles", []):
        lines.append(
            f"p) B={prof['batch']}, {prof.get('adapters', 0)} adapters: kernels {prof['kernel_us_per_step']:.0f} us/step, "
            f"{prof['launches_per_step']:.0f} launches/step"
        )
        for row in prof["top"]:
            lines.append(
                f"     {row['us_per_step']:8.1f} us {row['launches_per_step']:6.0f}x  {row['kernel']}"
            )
    return lines
