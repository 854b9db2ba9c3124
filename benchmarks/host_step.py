"""Host (Python) time of one decode `LLMEngine.step()` (issue 7), on the CPU demo model.

    python -m benchmarks.host_step                     # table at B=1/32/128, greedy and mixed batches
    python -m benchmarks.host_step --batches 128 --steps 400 --top 25

The model's forward is taken out: `engine.runner.execute` is replaced by a function handing back logits
made in advance, so what is timed is the host work the GPU waits for on every step (scheduler, block
manager, sampler, stop checks, detokenizer, outputs). The demo model's vocabulary is 512 tokens, so the
sampler's tensor ops cost their dispatch, not their arithmetic, which is what they cost the host on a GPU.
Every request decodes for the whole run (max_tokens up to the context, stop strings that never match,
special tokens kept out of the logits), so B stays fixed.

Mixes: `greedy` = every request greedy, nothing else asked; `mixed` = every 4th request has stop strings,
every 8th samples (temperature 0.8) with its own seed, every 8th asks for 5 logprobs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig
from engine.demo import write_demo_model
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPT_LEN = 64
NUM_TENANTS = 4
LOGIT_BANK = 64  # distinct logit tensors cycled through, so tokens (and text) vary step to step
# Parts timed by wrapping the engine's own callables (only those that exist are timed).
PARTS = ("scheduler.schedule", "scheduler.advance", "sampler", "_postprocess", "_collect")


def params_for(i: int, mix: str) -> SamplingParams:
    if mix == "greedy":
        return SamplingParams(max_tokens=None, temperature=0.0)
    if i % 8 == 1:
        return SamplingParams(max_tokens=None, temperature=0.8, seed=1000 + i)
    if i % 8 == 2:
        return SamplingParams(max_tokens=None, temperature=0.0, logprobs=5)
    if i % 4 == 3:
        return SamplingParams(max_tokens=None, temperature=0.0, stop=["<<END>>", "###STOP"])
    return SamplingParams(max_tokens=None, temperature=0.0)


def build_engine(model_dir: Path, batch: int, mix: str, seed: int = 0) -> LLMEngine:
    config = EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", max_num_seqs=batch, num_kv_blocks=batch * 130,
        max_num_batched_tokens=max(2048, batch * PROMPT_LEN), cuda_graphs=False,
    )  # fmt: skip
    engine = LLMEngine.from_config(config)
    vocab = engine.vocab_size
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(LOGIT_BANK, batch, vocab, generator=gen) * 3.0
    special = list(engine.tokenizer.all_special_ids) + list(engine.eos_token_ids)
    bank[:, :, special] = -30.0  # nobody stops on EOS: the batch keeps its size
    calls = [0]

    def fake_execute(scheduled: list[tuple[Any, int]], input_ids: Any = None) -> torch.Tensor:
        calls[0] += 1
        return bank[calls[0] % LOGIT_BANK, : len(scheduled)]

    engine.runner.execute = fake_execute  # type: ignore[method-assign]
    rng = torch.Generator().manual_seed(seed + 1)
    for i in range(batch):
        prompt = torch.randint(len(special) + 4, vocab, (PROMPT_LEN,), generator=rng).tolist()
        tenant = f"tenant-{i % NUM_TENANTS}"
        engine.add_request(f"r{i}", prompt, params_for(i, mix), cache_salt=tenant, fairness_key=tenant)
    return engine


def timed(fn: Callable[..., Any], acc: dict[str, float], name: str) -> Callable[..., Any]:
    """fn, adding the seconds of each call to acc[name]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[name] += time.perf_counter() - start

    return wrapper


class _TimedSampler:
    """The engine's Sampler with its two entry points timed (a call, and sample_tensor for steps run
    ahead); everything else passes through. Installed wherever the engine holds its sampler."""

    def __init__(self, inner: Any, acc: dict[str, float]) -> None:
        self.inner = inner
        self.sample_tensor = timed(inner.sample_tensor, acc, "sampler")
        self._call = timed(inner.__call__, acc, "sampler")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


def _install_part_timers(engine: LLMEngine) -> dict[str, float]:
    acc = dict.fromkeys(PARTS, 0.0)
    timed_sampler = _TimedSampler(engine.sampler, acc)
    engine.sampler = timed_sampler  # type: ignore[assignment]
    engine.ahead.sampler = timed_sampler  # type: ignore[assignment]
    for name in PARTS:
        if name == "sampler":
            continue
        owner: Any = engine
        attr = name
        if "." in name:
            owner_name, attr = name.split(".")
            owner = getattr(engine, owner_name)
        fn = getattr(owner, attr, None)
        if fn is not None:
            setattr(owner, attr, timed(fn, acc, name))
    return acc


def warm_up(engine: LLMEngine, batch: int, steps: int) -> None:
    """Prefill everyone (free here: no forward), then a few decode steps."""
    for _ in range(steps):
        engine.step()
    running = engine.scheduler.num_running
    assert running == batch and engine.scheduler.num_waiting == 0, (running, batch)


def measure(model_dir: Path, batch: int, mix: str, steps: int, warmup: int, rounds: int) -> dict[str, float]:
    engine = build_engine(model_dir, batch, mix)
    warm_up(engine, batch, warmup)
    medians, times = [], []
    for _ in range(rounds):  # best round: a shared machine's noise only ever adds time
        round_times = []
        for _ in range(steps):
            start = time.perf_counter()
            outs = engine.step()
            round_times.append(time.perf_counter() - start)
            assert len(outs) == batch and not any(o.finished for o in outs)
        medians.append(statistics.median(round_times))
        times += round_times
    # Parts in a second pass: the wrappers cost a little, so they do not touch the totals above.
    acc = _install_part_timers(engine)
    for _ in range(steps):
        engine.step()
    row = {"median_ms": min(medians) * 1e3, "mean_ms": statistics.fmean(times) * 1e3}
    row.update({name: total / steps * 1e3 for name, total in acc.items()})
    engine.close()
    return row


def profile(model_dir: Path, batch: int, mix: str, steps: int, warmup: int, top: int) -> str:
    engine = build_engine(model_dir, batch, mix)
    warm_up(engine, batch, warmup)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    engine.close()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    # Time inside torch calls: on this CPU that is the sampler's tensor arithmetic too (argmax, top-k,
    # exponential draws), which on a GPU is device work and only its launches are host time.
    in_torch = sum(row[2] for (_, _, name), row in stats.stats.items() if "torch" in name)
    text.write(f"inside torch calls: {in_torch / steps * 1e3:.3f} ms/step (profiled)\n")
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--mixes", default="greedy,mixed")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --steps; the best median is shown")
    parser.add_argument("--top", type=int, default=15, help="functions listed from the profile")
    parser.add_argument("--profile", default="128:mixed", help="B:mix to profile, or '' for none")
    parser.add_argument("--model", help="demo model folder (made in a temporary folder when absent)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # host work is single-threaded; extra intra-op threads only add noise

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else write_demo_model(Path(tmp) / "demo")
        batches = [int(b) for b in args.batches.split(",") if b]
        mixes = [m for m in args.mixes.split(",") if m]
        header = f"{'B':>4} {'mix':<7} {'median':>8} {'mean':>7} " + " ".join(
            f"{p.split('.')[-1]:>11}" for p in PARTS
        )
        print("host ms per decode step, forward excluded: best of the rounds' medians, and the mean of all")
        print("steps; the parts (ms/step) come from a further pass with a timer around each")
        print(header)
        for batch in batches:
            for mix in mixes:
                row = measure(model_dir, batch, mix, args.steps, args.warmup, args.rounds)
                parts = " ".join(f"{row[p]:>11.3f}" for p in PARTS)
                print(f"{batch:>4} {mix:<7} {row['median_ms']:>8.3f} {row['mean_ms']:>7.3f} {parts}")
        if args.profile:
            batch_s, mix = args.profile.split(":")
            print(f"\ntop functions by own time, B={batch_s} {mix}, {args.steps} steps (cProfile):")
            print(profile(model_dir, int(batch_s), mix, args.steps, args.warmup, args.top))


if __name__ == "__main__":
    main()
