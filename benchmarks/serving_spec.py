"""Workload v (issue 14): speculative decoding on the serving benchmark's model (Llama-3-8B-shaped, bf16,
random weights). Random weights make real acceptance rates meaningless, so it measures what does not
depend on them and bounds the rest:

- verify_cost: one forward verifying k = 1, 2, 4, 8 drafted tokens (k + 1 query tokens per sequence, logits
  of every token) at B = 1, 8, 32, 64, against a plain decode forward of the same sequences;
- oracle: a proposer that returns the target's own greedy continuation, recorded in an earlier run
  without speculation (the upper bound): decode tokens/s at B = 1 and 32 (16 distinct adapters at 32),
  k = 4, with and without speculation;
- ngram: prompt lookup on the same prompts (random models fall into loops that it catches): acceptance
  and tokens/s, adaptive switch on;
- draft: a random Llama-3.2-1B-shaped draft model (acceptance near zero), with the adaptive switch-off
  (default settings) and without it (min_acceptance_rate 0): the switch-off should cost at most a few
  percent against no speculation;
- the last batch's oracle again on a second engine in deterministic mode, where verify forwards give
  decode forwards' tokens, so the recording is accepted whole (`--memory-fraction 0.4` leaves it room).
Each run reports where its time went: median and longest step, time in steps over twice the median, and
the proposer's host time (a draft model's forwards included).

    PYTHONPATH=. python3 -m benchmarks.serving --only v --memory-fraction 0.4 --out benchmarks/results  # H200
    PYTHONPATH=. python3 -m benchmarks.serving --smoke --only v --out /tmp/spec-smoke                   # CPU
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.host_step import timed
from benchmarks.serving_workloads import Bench, ForwardTimer, start_decoding
from engine.cuda_graphs import ATTENTION_ONLY
from engine.request import LoRARequest, Request
from engine.sampling_params import SamplingParams
from engine.spec.config import SpeculativeConfig
from engine.spec.decoder import SpecDecoder
from engine.spec.proposer import NgramProposer

K = 4
VERIFY_KS = (1, 2, 4, 8)
LLAMA32_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64}  # fmt: skip


def key(request: Request) -> tuple[Any, ...]:
    return (tuple(request.prompt_token_ids), request.adapter_hash)


class OracleProposer:
    """Drafts the continuation a run without speculation produced for the same prompt and adapter."""

    def __init__(self, continuations: dict[tuple[Any, ...], list[int]]) -> None:
        self.continuations = continuations

    def propose(self, requests: list[Request], max_lens: list[int]) -> list[list[int]]:
        out = []
        for r, k in zip(requests, max_lens, strict=True):
            done = r.num_output_tokens
            out.append(self.continuations.get(key(r), [])[done : done + k])
        return out

    def retain(self, running: list[Request]) -> None:
        pass


def _sync(bench: Bench) -> None:
    if bench.cuda:
        torch.cuda.synchronize()


# ---- verify-step cost ----
def forward_ms(bench: Bench, requests: list[Request], q: int, reps: int) -> float:
    """Median time of one forward computing q query tokens for each decoding request (q > 1: a verify
    forward, logits of every token). The q - 1 extra tokens stand in for drafts; their KV lands past the
    sequences' length (never read) and the blocks for them hold no cached hash (they are allocated before
    the stand-ins are appended)."""
    engine, runner = bench.engine, bench.engine.runner
    for r in requests:
        if not engine.block_manager.allocate_slots(r, q):
            raise RuntimeError("KV cache too small for the verify measurement")
        r.all_token_ids.extend([r.all_token_ids[-1]] * (q - 1))
    batch = [(r, q) for r in requests]
    times = []
    try:
        for i in range(reps + 3):
            _sync(bench)
            t = time.perf_counter()
            runner.execute(batch, all_logits=q > 1)
            _sync(bench)
            if i >= 3:
                times.append(time.perf_counter() - t)
    finally:
        for r in requests:
            del r.all_token_ids[len(r.all_token_ids) - (q - 1) :]
    return statistics.median(times) * 1e3


def verify_costs(bench: Bench, batches: list[int], reps: int) -> list[dict[str, Any]]:
    rows = []
    engine = bench.engine
    for b in batches:
        engine.async_scheduling = False  # no step left in flight: every sequence at its last real token
        try:
            ids = start_decoding(bench, b, None, bench.tag("verify"))
        finally:
            engine.async_scheduling = True
        requests = list(engine.scheduler.running)
        plain = forward_ms(bench, requests, 1, reps)
        row: dict[str, Any] = {"batch": b, "decode_ms": plain}
        graphs = engine.runner.graphs
        for k in VERIFY_KS:
            ms = forward_ms(bench, requests, k + 1, reps)
            row[f"k{k}_ms"] = ms
            row[f"k{k}_over_decode"] = ms / plain
            # Every draft accepted: k + 1 tokens per verify forward instead of 1 per decode forward.
            row[f"k{k}_ideal_speedup"] = (k + 1) * plain / ms
            if graphs is not None:
                row[f"k{k}_graph"] = graphs.bucket([(r, k + 1) for r in requests], True) is not None
        for rid in ids:
            engine.abort(rid)
        rows.append(row)
        print(f"verify cost B={b}: " + ", ".join(f"{k}={v:.3g}" for k, v in row.items() if k != "batch"))
    return rows


# ---- generation with and without speculation ----
def generate(
    bench: Bench,
    prompts: list[list[int]],
    loras: list[LoRARequest | None],
    new_tokens: int,
    spec: SpecDecoder | None,
) -> dict[str, Any]:
    """Greedy generation of new_tokens per prompt; tokens/s over the decode part (timed from the step
    after every sequence has its first token to the last), and the outputs by (prompt, adapter)."""
    engine = bench.engine
    engine.spec, engine.ahead.spec = spec, spec
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tag = bench.tag("gen")
    latest: dict[str, list[int]] = {}
    for i, (p, lora) in enumerate(zip(prompts, loras, strict=True)):
        engine.add_request(f"{tag}-{i}", p, params, lora=lora, cache_salt=f"spec-{i}")
    requests = {r.request_id: r for r in [*engine.scheduler.running, *engine.scheduler.waiting()]}
    sched = engine.scheduler
    while sched.num_waiting or any(r.num_output_tokens == 0 for r in sched.running):
        for out in engine.step():
            latest[out.request_id] = out.outputs[0].token_ids
    start_tokens = sum(len(t) for t in latest.values())
    proposing = {"propose": 0.0}  # host seconds in the proposer (a draft model's forwards included)
    if spec is not None:
        spec.proposer.propose = timed(spec.proposer.propose, proposing, "propose")
    step_times: list[float] = []
    _sync(bench)
    t = time.perf_counter()
    try:
        while engine.has_unfinished():
            s = time.perf_counter()
            for out in engine.step():
                latest[out.request_id] = out.outputs[0].token_ids
            step_times.append(time.perf_counter() - s)
        _sync(bench)
    finally:
        if spec is not None:
            del spec.proposer.propose  # the class's method again
    wall = time.perf_counter() - t
    emitted = sum(len(v) for v in latest.values()) - start_tokens
    engine.spec = engine.ahead.spec = None
    median = statistics.median(step_times)
    return {
        "tokens_per_s": emitted / wall,
        "decode_steps": len(step_times),
        "tokens_per_step": emitted / max(len(step_times), 1),
        # Where the time went: a typical step, the longest, the time above 2x the median, the proposer.
        "step_ms_p50": median * 1e3,
        "step_ms_max": max(step_times) * 1e3,
        "slow_steps_extra_ms": sum(x - median for x in step_times if x > 2 * median) * 1e3,
        "propose_ms": proposing["propose"] * 1e3,
        "outputs": {key(requests[rid]): tokens for rid, tokens in latest.items()},
    }


def warm_tokens(new_tokens: int) -> int:
    """New tokens of a warm-up run (prefix cache, graphs, adapters resident, a draft's shadows)."""
    return max(4, new_tokens // 8)


def capture_spec_graphs(runner: Any, max_batch: int) -> None:
    """As an engine started with speculation has them: decode and k + 1 verify buckets captured up front,
    without adapters and for q/k/v/o ones, so no capture lands in a timed run."""
    runner.graphs = runner.make_graphs(max_batch=max_batch, verify_lens=(K + 1,))
    runner.graphs.capture_all([None, ATTENTION_ONLY])


def spec_decoder(bench: Bench, config: dict[str, Any], proposer: Any) -> SpecDecoder:
    spec = SpecDecoder(SpeculativeConfig(**config), bench.engine.max_model_len, proposer)
    spec.pad = bench.engine.runner.graphs is not None  # as LLMEngine sets it
    return spec


def summary(run: dict[str, Any], base: dict[str, Any], spec: SpecDecoder | None) -> dict[str, Any]:
    out = {k: v for k, v in run.items() if k != "outputs"}
    out["speedup"] = run["tokens_per_s"] / base["tokens_per_s"]
    out["same_tokens"] = run["outputs"] == base["outputs"]
    if spec is not None:
        stats = spec.stats
        out["acceptance"] = stats.num_accepted_tokens / max(stats.num_draft_tokens, 1)
        out["spec_stats"] = stats.as_dict()
        out["switch_offs"] = spec.switch.num_switch_offs
    return out


def make_draft(bench: Bench, work: Path, blocks: int) -> Any:
    """A random draft model: Llama-3.2-1B's shape on the GPU, the demo model with one layer on the CPU."""
    from benchmarks.serving_model import random_model
    from engine.spec.draft_model import DraftModelProposer

    target = Path(bench.engine.model.path)
    folder = work / "draft-1b"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(target, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.json.index"))
    raw = json.loads((target / "config.json").read_text())
    raw.update(LLAMA32_1B if bench.cuda else {"num_hidden_layers": 1})
    (folder / "config.json").write_text(json.dumps(raw))
    loaded = random_model(folder, bench.engine.model.dtype, bench.engine.runner.device, seed=1)
    config = SpeculativeConfig("draft_model", K, model=str(folder))
    return DraftModelProposer.build(bench.engine.config, config, loaded, blocks), str(folder)


def batch_of(bench: Bench, b: int, adapters: int) -> tuple[list[list[int]], list[LoRARequest | None]]:
    """b prompts of the decode length; adapters > 0: that many distinct q/k/v/o adapters, in turn."""
    prompts = [bench.prompt(bench.sizes.decode_prompt) for _ in range(b)]
    loras: list[LoRARequest | None] = [None] * b
    if adapters:
        bench.qkvo.prepare(list(range(adapters)))
        loras = [bench.qkvo.lora(i % adapters) for i in range(b)]
    return prompts, loras


def with_oracle(
    bench: Bench, prompts: list[list[int]], loras: list[LoRARequest | None], new_tokens: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base, oracle) summaries: generation without speculation, then with the oracle drafting it.
    In bf16 a verify forward (k + 1 tokens a row) rounds differently from a decode forward, so a near-tie
    of a random model can flip and the recorded continuation stops matching from there. Each pass
    drafts the previous pass's own output, which was computed by verify forwards: the matched part grows
    (at B = 1; in a batch the rows' acceptance changes the shapes, and so the rounding, from pass to pass)."""
    generate(bench, prompts, loras, warm_tokens(new_tokens), None)  # warm-up: prefix cache, graphs, adapters
    base = generate(bench, prompts, loras, new_tokens, None)
    oracle_cfg = {"method": "ngram", "num_speculative_tokens": K, "min_acceptance_rate": 0.0}
    continuations, passes = base["outputs"], []
    for _ in range(4):
        oracle_spec = spec_decoder(bench, oracle_cfg, OracleProposer(continuations))
        oracle = generate(bench, prompts, loras, new_tokens, oracle_spec)
        stats = oracle_spec.stats
        passes.append(stats.num_accepted_tokens / max(stats.num_draft_tokens, 1))
        if passes[-1] > 0.99 or oracle["outputs"] == continuations:
            break
        continuations = oracle["outputs"]
    return base, {**summary(oracle, base, oracle_spec), "acceptance_per_pass": passes}


def at_batch(bench: Bench, b: int, adapters: int, new_tokens: int, draft: Any) -> dict[str, Any]:
    prompts, loras = batch_of(bench, b, adapters)
    base, oracle = with_oracle(bench, prompts, loras, new_tokens)
    ngram_cfg = {"method": "ngram", "num_speculative_tokens": K}
    ngram_spec = spec_decoder(bench, ngram_cfg, NgramProposer(2, 5))
    ngram = generate(bench, prompts, loras, new_tokens, ngram_spec)
    out: dict[str, Any] = {
        "batch": b,
        "adapters": adapters,
        "new_tokens": new_tokens,
        "base": summary(base, base, None),
        "oracle": oracle,
        "ngram": summary(ngram, base, ngram_spec),
    }
    if draft is not None:
        draft_cfg = {"method": "ngram", "num_speculative_tokens": K}  # default switch-off settings
        generate(bench, prompts, loras, warm_tokens(new_tokens), spec_decoder(bench, draft_cfg, draft))
        adaptive = spec_decoder(bench, draft_cfg, draft)
        out["draft_adaptive"] = summary(generate(bench, prompts, loras, new_tokens, adaptive), base, adaptive)
        always = spec_decoder(bench, {**draft_cfg, "min_acceptance_rate": 0.0}, draft)
        out["draft_always"] = summary(generate(bench, prompts, loras, new_tokens, always), base, always)
    print(
        f"B={b}: base {base['tokens_per_s']:.1f} tok/s; oracle x{out['oracle']['speedup']:.2f} "
        f"(acceptance {out['oracle']['acceptance']:.2f}); ngram x{out['ngram']['speedup']:.2f} "
        f"(acceptance {out['ngram']['acceptance']:.2f})"
        + (
            f"; draft adaptive x{out['draft_adaptive']['speedup']:.3f}, always x{out['draft_always']['speedup']:.3f}"
            if draft is not None
            else ""
        ),
        flush=True,
    )
    return out


def workload_v(bench: Bench) -> dict[str, Any]:
    engine, runner = bench.engine, bench.engine.runner
    smoke = not bench.cuda
    execute = runner.execute
    inner = execute.inner if isinstance(execute, ForwardTimer) else execute  # all_logits passes through
    graphs = runner.graphs
    runner.execute = inner
    if graphs is not None:  # a fresh set with verify buckets, captured on first use (workload g does too)
        runner.graphs = runner.make_graphs(max_batch=64, verify_lens=tuple(k + 1 for k in VERIFY_KS))
    work = Path(engine.model.path).parent
    try:
        out: dict[str, Any] = {
            "k": K,
            "verify_cost": verify_costs(bench, [1, 2] if smoke else [1, 8, 32, 64], 3 if smoke else 20),
        }
        batches = [(1, 0), (2, 2)] if smoke else [(1, 0), (32, 16)]
        if graphs is not None:
            start = time.perf_counter()
            capture_spec_graphs(runner, max(b for b, _ in batches))
            out["graph_capture_s"] = time.perf_counter() - start
        new_tokens = 8 if smoke else 256
        longest = max(b for b, _ in batches) * (bench.sizes.decode_prompt + new_tokens + 2 * K + 16)
        draft, draft_folder = make_draft(bench, work, 2 * -(-longest // engine.config.block_size))
        out["draft_model"] = draft_folder
        for b, adapters in batches:
            out[f"b{b}"] = at_batch(bench, b, adapters, new_tokens, draft)
        b, adapters = batches[-1]
        out[f"b{b}_deterministic"] = deterministic_oracle(bench, b, adapters, new_tokens)
        return out
    finally:
        engine.spec = engine.ahead.spec = None
        runner.execute, runner.graphs = execute, graphs


def deterministic_oracle(bench: Bench, b: int, adapters: int, new_tokens: int) -> dict[str, Any]:
    """The oracle on a second engine in deterministic mode (docs/quantization.md): each row is computed
    the same way whatever the batch and however many query tokens its sequence has, so a verify forward
    gives a decode forward's tokens and the recorded continuation is accepted whole. Both sides (with and
    without speculation) run in that mode."""
    from benchmarks.serving_fp8 import _free, second_engine

    engine = second_engine(bench, deterministic=True)
    try:
        det = dataclasses.replace(bench, engine=engine)
        runner = engine.runner
        if runner.graphs is not None:
            capture_spec_graphs(runner, b)
        prompts, loras = batch_of(det, b, adapters)
        base, oracle = with_oracle(det, prompts, loras, new_tokens)
    finally:
        _free(engine)
    print(
        f"B={b} deterministic mode: base {base['tokens_per_s']:.1f} tok/s; oracle x{oracle['speedup']:.2f} "
        f"(acceptance {oracle['acceptance']:.2f})",
        flush=True,
    )
    return {"batch": b, "adapters": adapters, "base": summary(base, base, None), "oracle": oracle}
