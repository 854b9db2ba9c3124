"""Workload s (issue 17): constrained decoding's cost. B requests (64 on the GPU), every one constrained
by a 20-field JSON schema, against the same B unconstrained, in tokens/s (target >= 0.95x); and the
schemas' compile time, cold and cached.

The benchmark model's word-level tokenizer ("t17") cannot spell JSON, so this workload swaps in a
byte-level BPE of the model's full vocabulary (128,256 ids on the GPU), built here in seconds from
deterministic merges of common characters: a mask step then walks a realistic 128k-token trie.
Constrained steps run ahead (async scheduling) with their masks filled while the next forward runs;
`steps_ahead` shows it.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from typing import Any

import torch

from benchmarks.host_step import timed
from benchmarks.serving_workloads import Bench
from engine.sampling_params import SamplingParams, StructuredSpec
from engine.structured import GrammarCompiler, MaskFiller, bitmask_width

REPEATS = 3  # timed (unconstrained, constrained) pairs
NEW_TOKENS = 64  # fewer than any answer to the 20-field schema needs: no constrained row ends early
PROMPT = 128
_KINDS: list[dict[str, Any]] = [
    {"type": "integer", "minimum": 0, "maximum": 999},
    {"type": "string", "maxLength": 8},
    {"type": "boolean"},
    {"enum": ["alpha", "beta", "gamma"]},
    {"type": "number", "minimum": 0, "maximum": 100},
]


def twenty_field_schema(variant: int = 0) -> dict[str, Any]:
    """Twenty required fields of mixed, bounded types; `variant` renames them (a distinct schema each)."""
    props = {f"f{variant}_{i}": _KINDS[(i + variant) % len(_KINDS)] for i in range(20)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def byte_bpe(vocab_size: int, eos_id: int, seed: int = 0) -> Any:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids (`eos_id` its EOS): the 256 byte symbols,
    then merges of an existing token with a common character until the vocabulary is full."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    common = [c for c in alphabet if c.isalnum()] + list('Ġ"{}[]:,.-_') * 4
    rng = random.Random(seed)
    tokens, merges, seen = list(alphabet), [], set(alphabet)
    while len(tokens) < vocab_size - 1:
        left = tokens[min(int(rng.expovariate(1 / 4000)), len(tokens) - 1)]
        right = rng.choice(common)
        if left + right in seen or len(left) > 12:
            continue
        seen.add(left + right)
        tokens.append(left + right)
        merges.append((left, right))
    eos = "<|eot_id|>"
    tokens.insert(eos_id, eos)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eos, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


# Host phases timed in every run (seconds summed over the run, reported per step): where a constrained
# step's time goes. advance: launch the next step and wait for this one's tokens; postprocess: the
# tokens' host work (grammar accepts, detokenizing, stops); masks: the bitmask fill; settle: masks and
# the sampling launches of the step ahead.
PHASES = {"advance": ("ahead", "advance"), "postprocess": (None, "_postprocess"),
          "masks": ("sampler", "_grammar_masks"), "settle": ("ahead", "settle")}  # fmt: skip


def _wrap_phases(engine: Any, totals: dict[str, float]) -> list[tuple[Any, str]]:
    """Time each phase's method on its instance (host_step's `timed`); returns what to delete afterwards."""
    wrapped = []
    for phase, (attr, method) in PHASES.items():
        owner = engine if attr is None else getattr(engine, attr)
        setattr(owner, method, timed(getattr(owner, method), totals, phase))
        wrapped.append((owner, method))
    return wrapped


def _run(bench: Bench, params: list[SamplingParams]) -> dict[str, Any]:
    engine = bench.engine
    tag = bench.tag("s")
    ahead = engine.num_steps_ahead
    totals = dict.fromkeys(PHASES, 0.0)
    wrapped = _wrap_phases(engine, totals)
    steps = 0
    start = time.perf_counter()
    try:
        for i, p in enumerate(params):
            engine.add_request(f"{tag}-{i}", bench.prompt(PROMPT), p)
        outputs: dict[str, Any] = {}
        while engine.has_unfinished():
            steps += 1
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
        seconds = time.perf_counter() - start
    finally:
        for owner, method in wrapped:
            delattr(owner, method)  # the class's method again
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs.values())
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "steps": steps,
        "steps_ahead": engine.num_steps_ahead - ahead,
        "host_ms_per_step": {k: v * 1e3 / steps for k, v in totals.items()},
        "texts": [outputs[f"{tag}-{i}"].outputs[0].text for i in range(len(params))],
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def mask_costs(
    grammars: GrammarCompiler, specs: list[StructuredSpec], batch: int, cuda: bool
) -> dict[str, float]:
    """Median ms, over 10 tries, of the host work of one constrained step's masks for `batch` fresh
    matchers: pinning a new mask buffer (what each step paid before MaskFiller), MaskFiller.fill (the
    thread pool, into reused buffers), and the same masks computed one after another on this thread."""
    states = [grammars.matcher(specs[i % len(specs)]) for i in range(batch)]
    vocab = grammars.vocab_size
    filler = MaskFiller(vocab, torch.device("cpu"))  # the host fill alone, no copy to the device
    one = torch.empty(bitmask_width(vocab), dtype=torch.int32)

    def pinned() -> None:
        torch.zeros((batch, bitmask_width(vocab)), dtype=torch.int32, pin_memory=cuda)

    def serial() -> None:
        for s in states:
            s.matcher.unsafe_compute_mask_ptr(one.data_ptr(), one.numel() * 4)

    out = {}
    for name, fn in (("pin_new_buffer", pinned), ("fill_thread_pool", lambda: filler.fill(states)),
                     ("fill_one_thread", serial)):  # fmt: skip
        times = []
        for _ in range(10):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[f"{name}_ms"] = statistics.median(times) * 1e3
    return out


def workload_s(bench: Bench) -> dict[str, Any]:
    engine = bench.engine
    batch = bench.sizes.b_batch
    new_tokens = NEW_TOKENS if bench.cuda else 8
    saved = engine.tokenizer, engine.grammars
    start = time.perf_counter()
    tokenizer = byte_bpe(engine.vocab_size, engine.eos_token_ids[0])
    tokenizer_build_s = time.perf_counter() - start
    engine.tokenizer, engine.grammars = tokenizer, GrammarCompiler(tokenizer, engine.vocab_size)
    try:
        start = time.perf_counter()
        engine.grammars.compile(StructuredSpec("json"), timeout_s=120)  # builds llguidance's tokenizer
        ll_tokenizer_s = time.perf_counter() - start
        specs = [StructuredSpec("json_schema", json.dumps(twenty_field_schema(v))) for v in range(20)]
        start = time.perf_counter()
        for spec in specs:
            engine.grammars.compile(spec)
        cold_ms = (time.perf_counter() - start) * 1e3 / len(specs)
        start = time.perf_counter()
        for spec in specs:
            engine.grammars.matcher(spec)  # what each request pays: a cache hit and a copy
        cached_ms = (time.perf_counter() - start) * 1e3 / len(specs)

        def params(constrained: bool) -> list[SamplingParams]:
            return [
                SamplingParams(
                    max_tokens=new_tokens,
                    temperature=0.0,
                    ignore_eos=True,
                    structured=specs[i % len(specs)] if constrained else None,
                )
                for i in range(batch)
            ]

        # Warm-up at the timed batch size (its prefill shapes compile kernels once), then alternating
        # timed pairs; each side's median run is reported, so neither pays the other's first-run costs.
        masks = mask_costs(engine.grammars, specs, batch, bench.cuda)
        _run(bench, params(False))
        _run(bench, params(True))
        frees, constraineds = [], []
        for _ in range(REPEATS):
            frees.append(_run(bench, params(False)))
            constraineds.append(_run(bench, params(True)))
        free = _median_run(frees)
        constrained = _median_run(constraineds)
    finally:
        engine.tokenizer, engine.grammars = saved
    prefixes_ok = all(t.startswith('{"f') for t in constrained.pop("texts"))
    free.pop("texts")
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "vocab_size": engine.vocab_size,
        "bpe_build_s": tokenizer_build_s,
        "llguidance_tokenizer_s": ll_tokenizer_s,
        "compile_cold_ms": cold_ms,
        "compile_cached_ms": cached_ms,
        "unconstrained": free,
        "constrained": constrained,
        "constrained_over_unconstrained": constrained["tokens_per_s"] / free["tokens_per_s"],
        "constrained_outputs_are_json_prefixes": prefixes_ok,
        "mask_costs": masks,
    }
