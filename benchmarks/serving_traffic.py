"""Workloads d (prefix cache TTFT) and f (adapter load times), each against its baseline in the same
process (e, 1,000 adapters under Poisson arrivals: benchmarks/serving_e.py)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks.serving_e import stage_table
from benchmarks.serving_s3 import workload_f_s3
from benchmarks.serving_workloads import Bench
from engine.lora import load_adapter
from engine.lora_slots import LoRASlots, pin_adapter
from engine.request import LoRARequest
from engine.sampling_params import SamplingParams


def _ttft(bench: Bench, rid: str, prompt: list[int], salt: str, lora: LoRARequest | None = None) -> float:
    """Seconds from submit to the first token, the engine otherwise idle."""
    engine = bench.engine
    start = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0), lora=lora, cache_salt=salt)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def workload_d(bench: Bench) -> dict[str, Any]:
    s = bench.sizes
    tag = bench.tag("d")
    # Warm the prefill path at this length once (kernel compilation), on a tenant of its own.
    _ttft(bench, f"{tag}-w", bench.prompt(s.d_system + s.d_question), f"{tag}-warm")
    cold, warm, cached = [], [], []
    for t in range(s.d_tenants):
        system, salt = bench.prompt(s.d_system), f"{tag}-tenant{t}"
        cold.append(_ttft(bench, f"{tag}-c{t}", system + bench.prompt(s.d_question), salt))
        before = bench.engine.block_manager.stats.hit_rate
        warm.append(_ttft(bench, f"{tag}-h{t}", system + bench.prompt(s.d_question), salt))
        cached.append(bench.engine.block_manager.stats.hit_rate > before)
    # Another tenant's identical system prompt must not hit (salted hashes): its TTFT is a cold one.
    other = _ttft(bench, f"{tag}-x", system + bench.prompt(s.d_question), f"{tag}-intruder")
    cold_ms, warm_ms = statistics.median(cold) * 1e3, statistics.median(warm) * 1e3
    return {
        "system_tokens": s.d_system,
        "question_tokens": s.d_question,
        "tenants": s.d_tenants,
        "cold_ttft_ms": cold_ms,
        "warm_ttft_ms": warm_ms,
        "warm_over_cold": warm_ms / cold_ms,
        "other_tenant_same_prompt_ttft_ms": other * 1e3,
        "warm_hit_every_time": all(cached),
    }


def workload_f(bench: Bench) -> dict[str, Any]:
    """One adapter: disk -> GPU slot through the cache (read, sha256, parse, pin, copy), and CPU (pinned)
    -> GPU slot alone; also the disk -> CPU part. Then S3 -> GPU slot through the server's own code
    (benchmarks/serving_s3.py), and its download part alone."""
    engine = bench.engine
    cache, loaded = engine.adapter_cache, engine.model
    cfg, rank = loaded.config, bench.qkvo.rank
    disk_to_gpu, disk_to_cpu, cpu_to_gpu = [], [], []
    scratch = LoRASlots(cfg, 1, engine.config.max_lora_rank, loaded.dtype, loaded.device)
    base_index = 10_000_000  # never used by another workload
    started = time.monotonic()
    for k in range(5):
        lora = bench.qkvo.lora(base_index + k)
        start = time.perf_counter()
        while cache.acquire(lora) is None:
            cache.wait_for_loads(timeout=0.001)
        disk_to_gpu.append(time.perf_counter() - start)
        cache.release(lora)
        start = time.perf_counter()
        adapter = pin_adapter(load_adapter(lora.lora_path, cfg, rank, loaded.dtype, lora.content_hash))
        disk_to_cpu.append(time.perf_counter() - start)
        start = time.perf_counter()
        event = scratch.write(0, adapter)
        if event is not None:
            event.synchronize()
        cpu_to_gpu.append(time.perf_counter() - start)
        cache.evict(lora.content_hash)
    del scratch
    stages = stage_table([r for r in cache.load_records() if r.submitted >= started])
    s3 = workload_f_s3(bench)
    if bench.cuda:
        torch.cuda.empty_cache()
    return {
        "adapter_bytes": bench.qkvo.nbytes(),
        "disk_to_gpu_ms": statistics.median(disk_to_gpu) * 1e3,
        "disk_to_cpu_ms": statistics.median(disk_to_cpu) * 1e3,
        "cpu_to_gpu_ms": statistics.median(cpu_to_gpu) * 1e3,
        "cpu_to_gpu_GBps": bench.qkvo.nbytes() / statistics.median(cpu_to_gpu) / 1e9,
        "disk_to_gpu_stages": stages,  # page cache warm here (the file was just written); e's idle row is cold
        **s3,
    }
