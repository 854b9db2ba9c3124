"""Workloads d (prefix cache TTFT), e (1,000 adapters, Zipf popularity, Poisson arrivals) and f (adapter
load times), each against its baseline in the same process."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import numpy as np
import torch

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


def _trace(bench: Bench, with_adapters: bool, seed: int) -> list[tuple[float, list[int], int | None]]:
    """(arrival s, prompt, adapter index) for e_requests Poisson arrivals; adapters Zipf(1.0) over e_adapters."""
    s = bench.sizes
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, s.e_adapters + 1)
    picks = np_rng.choice(s.e_adapters, size=s.e_requests, p=weights / weights.sum())
    out, t = [], 0.0
    for i in range(s.e_requests):
        t += rng.expovariate(s.e_rate)
        prompt = [rng.randrange(10, bench.engine.vocab_size - 10) for _ in range(s.e_prompt)]
        out.append((t, prompt, int(picks[i]) if with_adapters else None))
    return out


def _serve(bench: Bench, trace: list[tuple[float, list[int], int | None]], tag: str) -> dict[str, Any]:
    engine, s = bench.engine, bench.sizes
    params = SamplingParams(max_tokens=s.e_new, temperature=0.0, ignore_eos=True)
    arrivals: dict[str, float] = {}
    first: dict[str, float] = {}
    tokens, failed, nxt = 0, 0, 0
    # Per step: (wall s, running, waiting, adapter loads in flight), to show what limits the run.
    trace_steps: list[tuple[float, int, int, bool]] = []
    cache, graphs = engine.adapter_cache, engine.runner.graphs
    replays_before = graphs.replays if graphs is not None else 0

    def loading() -> bool:
        return cache is not None and cache.has_pending_loads

    start = time.perf_counter()
    last_finish = start
    while nxt < len(trace) or engine.has_unfinished():
        now = time.perf_counter() - start
        while nxt < len(trace) and trace[nxt][0] <= now:
            at, prompt, index = trace[nxt]
            rid = f"{tag}-{nxt}"
            lora = bench.qkvo.lora(index) if index is not None else None
            engine.add_request(rid, prompt, params, lora=lora, cache_salt=rid)
            arrivals[rid] = at
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.01, trace[nxt][0] - now)))
            continue
        t0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter() - start
        trace_steps.append(
            (now + start - t0, len(engine.scheduler.running), engine.scheduler.num_waiting, loading())
        )
        for o in outs:
            if o.request_id not in first and o.outputs and o.outputs[0].token_ids:
                first[o.request_id] = now
            if o.finished:
                failed += o.error is not None
                tokens += len(o.outputs[0].token_ids)
                last_finish = time.perf_counter()
    ttfts = sorted(first[r] - arrivals[r] for r in first)
    span = last_finish - start - trace[0][0]
    return {
        "requests": len(trace),
        "failed": failed,
        "output_tokens": tokens,
        "tokens_per_s": tokens / span,
        "ttft_p50_ms": float(np.percentile(ttfts, 50)) * 1e3,
        "ttft_p99_ms": float(np.percentile(ttfts, 99)) * 1e3,
        "steps": len(trace_steps),
        "graph_replays": (graphs.replays - replays_before) if graphs is not None else 0,
        "step_ms_mean": 1e3 * sum(w for w, *_ in trace_steps) / max(1, len(trace_steps)),
        "running_mean": sum(r for _, r, _, _ in trace_steps) / max(1, len(trace_steps)),
        "waiting_mean": sum(w for _, _, w, _ in trace_steps) / max(1, len(trace_steps)),
        "steps_with_loads_in_flight": sum(1 for *_, lo in trace_steps if lo),
    }


def workload_e(bench: Bench) -> dict[str, Any]:
    s = bench.sizes
    lora_trace = _trace(bench, True, seed=11)
    base_trace = [(t, p, None) for t, p, _ in lora_trace]  # the same arrivals and prompts, no adapters
    used = sorted({i for _, _, i in lora_trace if i is not None})
    bench.qkvo.prepare(used)  # hashes known up front; files may still be rewritten on demand (LRU)
    stats_before = dict(bench.engine.adapter_cache.stats())
    lora = _serve(bench, lora_trace, bench.tag("e"))
    stats_after = dict(bench.engine.adapter_cache.stats())
    base = _serve(bench, base_trace, bench.tag("eb"))
    return {
        "registered_adapters": s.e_adapters,
        "gpu_slots": bench.engine.adapter_cache.slots.num_slots,
        "distinct_adapters_used": len(used),
        "rate_per_s": s.e_rate,
        "prompt": s.e_prompt,
        "new_tokens": s.e_new,
        "lora": lora,
        "base": base,
        "throughput_ratio": lora["tokens_per_s"] / base["tokens_per_s"],
        "adapter_loads": stats_after["loads"] - stats_before["loads"],
        "adapter_load_seconds": stats_after["load_seconds"] - stats_before["load_seconds"],
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
    s3 = workload_f_s3(bench)
    if bench.cuda:
        torch.cuda.empty_cache()
    return {
        "adapter_bytes": bench.qkvo.nbytes(),
        "disk_to_gpu_ms": statistics.median(disk_to_gpu) * 1e3,
        "disk_to_cpu_ms": statistics.median(disk_to_cpu) * 1e3,
        "cpu_to_gpu_ms": statistics.median(cpu_to_gpu) * 1e3,
        "cpu_to_gpu_GBps": bench.qkvo.nbytes() / statistics.median(cpu_to_gpu) / 1e9,
        **s3,
    }
