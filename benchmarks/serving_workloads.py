"""The serving benchmark's workloads a-f, each measured next to its baseline in the same process.

Every function takes a `Bench` (the engine, its model, adapter sets and sizes) and returns a plain dict
for the JSON table. GPU times come from CUDA events after warm-up, medians; wall times from the host clock
around whole engine steps (they include scheduling, sampling and the token read-back).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.serving_adapters import SeededAdapters
from engine.engine import LLMEngine
from engine.request import LoRARequest
from engine.sampling_params import SamplingParams


@dataclass
class Sizes:
    batch_sizes: list[int]
    decode_prompt: int
    steps: int
    warmup: int
    b_batch: int
    c_batch: int
    c_prompt: int
    c_new: int
    c_adapters: int
    d_system: int
    d_question: int
    d_tenants: int
    e_adapters: int
    e_requests: int
    e_rate: float
    e_prompt: int
    e_new: int


@dataclass
class Bench:
    engine: LLMEngine
    qkvo: SeededAdapters
    seven: SeededAdapters
    sizes: Sizes
    bandwidth: float  # bytes/s, measured device-to-device copy (read + write)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    runs: int = 0

    @property
    def cuda(self) -> bool:
        return self.engine.runner.device.type == "cuda"

    def prompt(self, n: int) -> list[int]:
        vocab = self.engine.vocab_size
        return [self.rng.randrange(10, vocab - 10) for _ in range(n)]

    def tag(self, name: str) -> str:
        self.runs += 1
        return f"{name}{self.runs}"


class ForwardTimer:
    """Wraps runner.execute: GPU time of each forward (CUDA events), and on request one graph-vs-eager
    comparison of the same decode batch (the eager forward first; both write the same KV)."""

    def __init__(self, runner: Any) -> None:
        self.runner, self.inner = runner, runner.execute
        self.events: list[tuple[Any, Any]] = []
        self.walls: list[float] = []
        self.check_next = False
        self.check_error: float | None = None
        self.last_logits: torch.Tensor | None = None
        self.last_batch: list[Any] = []
        # When a list: (request, output tokens so far, logits row) of every row run, for oracle checks
        # (with async scheduling a step() runs the next forward before it returns).
        self.rows: list[tuple[Any, int, torch.Tensor]] | None = None
        runner.execute = self

    def __call__(self, batch: list[Any], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        runner = self.runner
        eager = None
        if self.check_next and runner.graphs is not None and runner.graphs.accepts(batch):
            graphs, runner.graphs = runner.graphs, None  # the same step through the eager path
            try:
                eager = self.inner(batch, input_ids).clone()
            finally:
                runner.graphs = graphs
        if runner.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.inner(batch, input_ids)
            end.record()
            self.events.append((start, end))
        else:
            t = time.perf_counter()
            out = self.inner(batch, input_ids)
            self.walls.append(time.perf_counter() - t)
        if eager is not None:
            self.check_error = float((out - eager).norm() / eager.norm())
            self.check_next = False
        self.last_logits, self.last_batch = out, batch
        if self.rows is not None:
            ahead = int(input_ids is not None)  # a step ahead: one sampled token not appended yet
            self.rows += [(r, r.num_output_tokens + ahead, out[i].clone()) for i, (r, _) in enumerate(batch)]
        return out

    def reset(self) -> None:
        self.events, self.walls = [], []

    def median_ms(self) -> float:
        if self.events:
            torch.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) for s, e in self.events)
        return statistics.median(self.walls) * 1e3


def make_resident(bench: Bench, loras: list[LoRARequest]) -> None:
    """Load adapters into GPU slots before a measurement (then unpinned: they stay, LRU)."""
    cache = bench.engine.adapter_cache
    for lora in loras:
        while cache.acquire(lora) is None:
            cache.wait_for_loads(timeout=0.1)
        cache.release(lora)


def timer_of(bench: Bench) -> ForwardTimer:
    runner = bench.engine.runner
    return runner.execute if isinstance(runner.execute, ForwardTimer) else ForwardTimer(runner)


def weight_bytes(bench: Bench, batch: int) -> int:
    """Bytes a decode step must read from the weights: every matrix once, the embedding's B rows only."""
    model = bench.engine.runner.model.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.embed_tokens.weight
    return total - emb.numel() * emb.element_size() + batch * emb.shape[1] * emb.element_size()


def kv_bytes_per_token(bench: Bench) -> int:
    k, _ = bench.engine.runner.kv_caches[0]
    return 2 * len(bench.engine.runner.kv_caches) * k.shape[2] * k.shape[3] * k.element_size()


def start_decoding(bench: Bench, batch: int, loras: list[LoRARequest] | None, tag: str) -> list[str]:
    """Add `batch` sequences of decode_prompt tokens (adapters round-robin) and step until every one has
    its first token, so the following steps are pure decode. Returns their request ids (abort them)."""
    engine = bench.engine
    # Long enough that no sequence finishes while the last ones are still in prefill.
    params = SamplingParams(max_tokens=1024, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        lora = loras[i % len(loras)] if loras else None
        engine.add_request(rid, bench.prompt(bench.sizes.decode_prompt), params, lora=lora, cache_salt=rid)
    sched = engine.scheduler
    while sched.num_waiting or any(r.num_output_tokens == 0 for r in sched.running):
        engine.step()
    return ids


def decode(bench: Bench, batch: int, loras: list[LoRARequest] | None, check: bool = False) -> dict[str, Any]:
    """`batch` sequences of decode_prompt tokens, prefilled, then timed decode steps (all B every step)."""
    s, engine = bench.sizes, bench.engine
    timer = timer_of(bench)
    ids = start_decoding(bench, batch, loras, bench.tag("dec"))
    for _ in range(s.warmup):
        engine.step()
    timer.reset()
    timer.check_next = check
    walls = []
    ahead = engine.num_steps_ahead
    for _ in range(s.steps):
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    ahead = engine.num_steps_ahead - ahead
    forward_ms = timer.median_ms()
    if len(engine.scheduler.running) != batch:
        raise RuntimeError(f"{len(engine.scheduler.running)} sequences running, not {batch}")
    context = sum(r.num_tokens for r in engine.scheduler.running)
    for rid in ids:
        engine.abort(rid)
    distinct = len({lo.content_hash for lo in loras}) if loras else 0
    lora_bytes = 0
    if loras:
        adapters = bench.seven if loras[0].lora_name.startswith(bench.seven.prefix) else bench.qkvo
        lora_bytes = distinct * adapters.nbytes()
    roof_bytes = weight_bytes(bench, batch) + context * kv_bytes_per_token(bench) + lora_bytes
    roofline_ms = roof_bytes / bench.bandwidth * 1e3
    step_ms = statistics.median(walls) * 1e3
    out = {
        "batch": batch,
        "adapters": distinct,
        "mean_context": context / batch,
        "forward_ms": forward_ms,
        "step_ms": step_ms,
        "tokens_per_s": batch / step_ms * 1e3,
        "roofline_ms": roofline_ms,
        "roofline_tokens_per_s": batch / roofline_ms * 1e3,
        "forward_over_roofline": forward_ms / roofline_ms,
        "bytes_per_step": roof_bytes,
        "steps_ahead_share": ahead / s.steps,  # steps launched before the previous one's tokens were read
    }
    if check:
        out["graph_vs_eager_rel_err"] = timer.check_error
    return out


def workload_a(bench: Bench) -> dict[str, Any]:
    rows = [decode(bench, b, None, check=(b == 8)) for b in bench.sizes.batch_sizes]
    eager = {}
    runner = bench.engine.runner
    if runner.graphs is not None:
        graphs, runner.graphs = runner.graphs, None
        try:
            for b in sorted({1, min(32, bench.sizes.batch_sizes[-1]), bench.sizes.batch_sizes[-1]}):
                eager[str(b)] = decode(bench, b, None)
        finally:
            runner.graphs = graphs
    return {"rows": rows, "eager_rows": eager}


def workload_b(bench: Bench) -> dict[str, Any]:
    b = bench.sizes.b_batch
    bench.qkvo.prepare(list(range(b)))  # written and hashed in parallel, outside any timing
    bench.seven.prepare(list(range(b)))
    qkvo = [bench.qkvo.lora(i) for i in range(b)]
    seven = [bench.seven.lora(i) for i in range(b)]
    base = decode(bench, b, None)
    mixed = decode(bench, b, qkvo, check=True)
    all_seven = decode(bench, b, seven)
    return {
        "base": base,
        "qkvo": mixed,
        "all_seven": all_seven,
        "ablations": ablations(bench, b, qkvo),
        "qkvo_over_base_throughput": mixed["tokens_per_s"] / base["tokens_per_s"],
        "qkvo_over_base_forward": base["forward_ms"] / mixed["forward_ms"],
        "all_seven_forward_over_roofline": all_seven["forward_over_roofline"],
    }


def ablations(bench: Bench, batch: int, loras: list[LoRARequest]) -> dict[str, Any]:
    """The q/k/v/o batch again without each of this session's changes, same process: synchronous steps
    (async scheduling off), and the LoRA shrink inline instead of on its side stream (graphs re-captured
    in a fresh set)."""
    engine, runner = bench.engine, bench.engine.runner
    engine.async_scheduling = False
    try:
        out = {"sync_steps": decode(bench, batch, loras)}
    finally:
        engine.async_scheduling = True
    graphs, stream = runner.graphs, runner.lora_stream
    runner.lora_stream = None
    if graphs is not None:
        runner.graphs = runner.make_graphs(max_batch=graphs.max_batch)
    try:
        out["shrink_inline"] = decode(bench, batch, loras)
    finally:
        runner.lora_stream, runner.graphs = stream, graphs
    return out


def workload_g(bench: Bench) -> dict[str, Any]:
    """Baseline for the fused elementwise kernels: the same decode at B=1 and 32 with residual add +
    RMSNorm, RoPE and SiLU * mul in plain torch (the KV write stays a Triton launch, as before fusion),
    graphs re-captured in a pool of their own. Same process, same weights, same cache."""
    import dataclasses

    from kernels import attention, fused

    runner = bench.engine.runner
    graphs, ops = runner.graphs, runner.ops
    if graphs is None:
        return {"skipped": "no CUDA graphs"}

    def rope_then_write(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads):  # type: ignore[no-untyped-def]
        d = k_cache.shape[-1]
        q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        q = fused._rotate(q.reshape(-1, num_heads, d), c, s)
        k = fused._rotate(k.reshape(-1, num_kv_heads, d), c, s)
        attention.write_kv(
            k.contiguous(), v.reshape(-1, num_kv_heads, d).contiguous(), k_cache, v_cache, slots
        )
        return q.contiguous()

    runner.ops = dataclasses.replace(
        ops, rms_norm=fused.rms_norm_ref, rope_write_kv=rope_then_write, silu_mul=fused.silu_mul_ref
    )
    # Re-capturing into the first pool trips an allocator assert: a fresh set, captured on first use.
    runner.graphs = runner.make_graphs(max_batch=graphs.max_batch)
    try:
        rows = {str(b): decode(bench, b, None) for b in sorted({1, min(32, bench.sizes.batch_sizes[-1])})}
        rows["captured"] = len(runner.graphs.graphs)  # type: ignore[assignment]
    finally:
        runner.ops, runner.graphs = ops, graphs
    return {"unfused_rows": rows}
