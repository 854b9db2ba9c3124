"""Workload e: 1,000 registered adapters, Zipf(1.0) popularity, Poisson arrivals, against the base model
under the same arrivals (issue 19's honest version).

Runs, in one process:
- idle: 5 adapters never seen before loaded one at a time on the idle engine: each stage's reference time;
- warm-up (discarded): every request at once on those 5 adapters, so no kernel compiles in a timed run;
- capacity: the base model with every request arriving at once: its tokens/s and requests/s at saturation;
- cold: adapters never loaded before (a fresh index range), their files written, then pushed out of the
  page cache (`drop_caches` where the process may, else fsync + POSIX_FADV_DONTNEED per file); then base;
- warm: the same trace again (the adapters now in the CPU tier or in slots);
- sat: a fresh cold range at 90% of the measured base capacity, and the base model at the same arrivals.
Each run reports tokens/s, TTFT p50/p99 and TTFT split into: step lag (arrival -> into the engine, which
happens between steps), load wait (-> the adapter usable in a slot), queue wait (-> first scheduled) and
prefill (-> first token); and, per stage of every adapter load in the run, median / p90 wall and median
CPU time (engine/load_stages.py), next to the idle reference.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.serving_workloads import Bench
from benchmarks.triton_compiles import CompileLog
from engine.sampling_params import SamplingParams

Trace = list[tuple[float, list[int], int | None]]


def _trace(bench: Bench, seed: int, rate: float, offset: int) -> Trace:
    """(arrival s, prompt, adapter index) for e_requests Poisson arrivals (all at 0 when rate is inf);
    adapters Zipf(1.0) over e_adapters, numbered from `offset` (a fresh offset = adapters never seen)."""
    s = bench.sizes
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, s.e_adapters + 1)
    picks = np_rng.choice(s.e_adapters, size=s.e_requests, p=weights / weights.sum())
    out, t = [], 0.0
    for i in range(s.e_requests):
        t += rng.expovariate(rate) if rate != float("inf") else 0.0
        prompt = [rng.randrange(10, bench.engine.vocab_size - 10) for _ in range(s.e_prompt)]
        out.append((t, prompt, offset + int(picks[i])))
    return out


def _no_adapters(trace: Trace) -> Trace:
    return [(t, p, None) for t, p, _ in trace]


def drop_page_cache(bench: Bench, indices: list[int]) -> str:
    """Push these adapters' files out of the page cache; returns how."""
    for i in indices:
        for path in bench.qkvo.folder(i).iterdir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    if not bench.cuda:  # the CPU smoke run shares its machine: never drop everyone's page cache there
        return "fsync + posix_fadvise(DONTNEED) per adapter file"
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches (whole page cache) + fsync/fadvise DONTNEED per adapter file"
    except OSError:
        return "fsync + posix_fadvise(DONTNEED) per adapter file (drop_caches not allowed)"


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else 0.0


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": _pct(values, 50),
        "p99_ms": _pct(values, 99),
        "mean_ms": 1e3 * statistics.fmean(values or [0]),
    }


def stage_table(records: list[Any]) -> dict[str, Any]:
    """Per stage over these loads: median and p90 wall, median thread CPU time (ms)."""
    names = sorted({n for r in records for n in r.wall}, key=_stage_order)
    out: dict[str, Any] = {"loads": len(records)}
    for name in names:
        walls = [r.wall[name] for r in records if name in r.wall]
        cpus = [r.cpu.get(name, 0.0) for r in records if name in r.wall]
        out[name] = {"median_ms": _pct(walls, 50), "p90_ms": _pct(walls, 90), "cpu_median_ms": _pct(cpus, 50)}
    totals = [r.total for r in records if r.total > 0]
    out["total"] = {"median_ms": _pct(totals, 50), "p90_ms": _pct(totals, 90), "p99_ms": _pct(totals, 99)}
    return out


def _stage_order(name: str) -> int:
    from engine.load_stages import STAGES

    return STAGES.index(name) if name in STAGES else len(STAGES)


def _serve(bench: Bench, trace: Trace, tag: str, with_adapters: bool) -> dict[str, Any]:
    engine, s = bench.engine, bench.sizes
    params = SamplingParams(max_tokens=s.e_new, temperature=0.0, ignore_eos=True)
    cache, graphs = engine.adapter_cache, engine.runner.graphs
    arrivals: dict[str, float] = {}  # monotonic time of the trace's arrival
    requests: dict[str, Any] = {}
    first: dict[str, float] = {}
    tokens, failed, nxt = 0, 0, 0
    trace_steps: list[tuple[float, int, int, bool]] = []  # (wall s, running, waiting, loads in flight)
    step_spans: list[tuple[float, float]] = []  # (start, end) monotonic s of each step
    replays_before = graphs.replays if graphs is not None else 0
    compiles = CompileLog().__enter__()
    start = time.monotonic()
    last_finish = start
    while nxt < len(trace) or engine.has_unfinished():
        now = time.monotonic() - start
        while nxt < len(trace) and trace[nxt][0] <= now:
            at, prompt, index = trace[nxt]
            rid = f"{tag}-{nxt}"
            lora = bench.qkvo.lora(index) if with_adapters and index is not None else None
            engine.add_request(rid, prompt, params, lora=lora, cache_salt=rid)
            requests[rid] = engine.groups[rid].children[0]
            arrivals[rid] = start + at
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.01, trace[nxt][0] - now)))
            continue
        t0 = time.monotonic()
        outs = engine.step()
        now = time.monotonic()
        loading = cache is not None and cache.has_pending_loads
        trace_steps.append((now - t0, len(engine.scheduler.running), engine.scheduler.num_waiting, loading))
        step_spans.append((t0, now))
        for o in outs:
            if o.request_id not in first and o.outputs and o.outputs[0].token_ids:
                first[o.request_id] = now
            if o.finished:
                failed += o.error is not None
                tokens += len(o.outputs[0].token_ids)
                last_finish = now
    compiles.__exit__()
    slowest = sorted(range(len(trace_steps)), key=lambda i: -trace_steps[i][0])[:5]
    records = [r for r in cache.load_records() if r.submitted >= start] if cache is not None else []
    by_key: dict[str, list[Any]] = {}
    for record in records:
        by_key.setdefault(record.key, []).append(record)
    split: dict[str, list[float]] = {"step_lag": [], "load_wait": [], "queue_wait": [], "prefill": []}
    for rid, request in requests.items():
        m = request.metrics
        if rid not in first or m.first_scheduled_time is None:
            continue
        entered, scheduled = m.arrival_time, m.first_scheduled_time
        load_wait = 0.0
        if request.lora is not None:
            mine = [r for r in by_key.get(request.lora.key, []) if r.submitted <= scheduled]
            if mine:
                done = mine[-1].slotted or mine[-1].loaded
                load_wait = max(0.0, min(done, scheduled) - entered)
        split["step_lag"].append(max(0.0, entered - arrivals[rid]))
        split["load_wait"].append(load_wait)
        split["queue_wait"].append(max(0.0, scheduled - entered - load_wait))
        split["prefill"].append(max(0.0, first[rid] - scheduled))
    ttfts = sorted(first[r] - arrivals[r] for r in first)
    span = last_finish - start - trace[0][0]
    n = max(1, len(trace_steps))
    return {
        "requests": len(trace),
        "failed": failed,
        "output_tokens": tokens,
        "tokens_per_s": tokens / span,
        "ttft_p50_ms": _pct(ttfts, 50),
        "ttft_p99_ms": _pct(ttfts, 99),
        "ttft_split": {name: _summary(values) for name, values in split.items()},
        "steps": len(trace_steps),
        "graph_replays": (graphs.replays - replays_before) if graphs is not None else 0,
        "step_ms_mean": 1e3 * sum(w for w, *_ in trace_steps) / n,
        "step_ms_p99": _pct([w for w, *_ in trace_steps], 99),
        "running_mean": sum(r for _, r, _, _ in trace_steps) / n,
        "waiting_mean": sum(w for _, _, w, _ in trace_steps) / n,
        "steps_with_loads_in_flight": sum(1 for *_, lo in trace_steps if lo),
        "load_stages": stage_table(records),
        "triton_compiles": compiles.summary(),
        "slowest_steps": [
            {
                "at_s": step_spans[i][0] - start,
                "ms": 1e3 * trace_steps[i][0],
                "running": trace_steps[i][1],
                "waiting": trace_steps[i][2],
                "compiles": [name for *_, name in compiles.between(*step_spans[i])],
            }
            for i in slowest
        ],
    }


def _idle_loads(bench: Bench, offset: int, count: int = 5) -> dict[str, Any]:
    """`count` never-seen adapters, one at a time, on the idle engine (files out of the page cache)."""
    cache = bench.engine.adapter_cache
    indices = list(range(offset, offset + count))
    bench.qkvo.prepare(indices)
    drop_page_cache(bench, indices)
    start = time.monotonic()
    for i in indices:
        lora = bench.qkvo.lora(i)
        while (slot := cache.acquire(lora)) is None:
            cache.wait_for_loads(timeout=0.001)
        cache.release(lora)
        assert slot >= 0
    return stage_table([r for r in cache.load_records() if r.submitted >= start])


def _ratios(run: dict[str, Any], idle: dict[str, Any]) -> dict[str, float]:
    """Median stage time under load over the same stage on the idle engine."""
    out = {}
    for name, row in run["load_stages"].items():
        ref = idle.get(name)
        if isinstance(row, dict) and isinstance(ref, dict) and ref.get("median_ms", 0) > 0.05:
            out[name] = row["median_ms"] / ref["median_ms"]
    return out


def workload_e(bench: Bench) -> dict[str, Any]:
    s = bench.sizes
    idle = _idle_loads(bench, offset=9_000_000)
    # Warm-up, discarded: every request at once on the 5 adapters just loaded, so that the kernels of
    # mixed prefill shapes are compiled before anything is timed. Without it the first run of the
    # H200 call of 2026-12-03 (the capacity run) came out 42% below the same run in the next call.
    burst = _trace(bench, 5, float("inf"), 0)
    warmup = _serve(bench, [(t, p, 9_000_000 + i % 5) for t, p, i in burst], bench.tag("eup"), True)
    capacity_run = _serve(bench, burst, bench.tag("ecap"), with_adapters=False)
    capacity_rps = capacity_run["tokens_per_s"] / s.e_new
    stats_before = dict(bench.engine.adapter_cache.stats())

    cold_trace = _trace(bench, 11, s.e_rate, offset=1_000_000)
    used = sorted({i for _, _, i in cold_trace if i is not None})
    bench.qkvo.prepare(used)  # hashes known up front, as the server knows them from its database
    page_cache = drop_page_cache(bench, used)
    cold = _serve(bench, cold_trace, bench.tag("e"), with_adapters=True)
    stats_after = dict(bench.engine.adapter_cache.stats())
    base = _serve(bench, _no_adapters(cold_trace), bench.tag("eb"), with_adapters=False)
    warm = _serve(bench, cold_trace, bench.tag("ew"), with_adapters=True)

    sat_rate = 0.9 * capacity_rps
    sat_trace = _trace(bench, 13, sat_rate, offset=2_000_000)
    sat_used = sorted({i for _, _, i in sat_trace if i is not None})
    bench.qkvo.prepare(sat_used)
    drop_page_cache(bench, sat_used)
    sat = _serve(bench, sat_trace, bench.tag("es"), with_adapters=True)
    sat_base = _serve(bench, _no_adapters(sat_trace), bench.tag("esb"), with_adapters=False)
    return {
        "registered_adapters": s.e_adapters,
        "gpu_slots": bench.engine.adapter_cache.slots.num_slots,
        "cpu_tier": bench.engine.config.max_cpu_loras,
        "distinct_adapters_used": len(used),
        "rate_per_s": s.e_rate,
        "prompt": s.e_prompt,
        "new_tokens": s.e_new,
        "page_cache": page_cache,
        "idle_load_stages": idle,
        "base_capacity": {"tokens_per_s": capacity_run["tokens_per_s"], "requests_per_s": capacity_rps},
        "warmup_tokens_per_s": warmup["tokens_per_s"],
        "lora": cold,  # the cold run (the key earlier sessions' tables read)
        "base": base,
        "warm": warm,
        "throughput_ratio": cold["tokens_per_s"] / base["tokens_per_s"],
        "warm_throughput_ratio": warm["tokens_per_s"] / base["tokens_per_s"],
        "cold_stage_over_idle": _ratios(cold, idle),
        "sat": {
            "rate_per_s": sat_rate,
            "distinct_adapters_used": len(sat_used),
            "lora": sat,
            "base": sat_base,
            "throughput_ratio": sat["tokens_per_s"] / sat_base["tokens_per_s"],
            "stage_over_idle": _ratios(sat, idle),
        },
        "adapter_pool": {k: stats_after[k] for k in ("pool_misses", "pool_free_blocks") if k in stats_after},
        "adapter_loads": stats_after["loads"] - stats_before["loads"],
        "adapter_load_seconds": stats_after["load_seconds"] - stats_before["load_seconds"],
    }
