"""Shared by the speculative decoding tests: a tiny Llama with adapters, and a proposer that drafts a known
continuation with chosen mistakes (so steps accept all, some or none of their drafts)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from engine import LLM
from engine.request import Request
from tests.helpers.hf_models import VOCAB_SIZE

CPU = {"device": "cpu", "dtype": "float32", "block_size": 4, "num_kv_blocks": 128, "max_lora_rank": 8}


def prompts(n: int, seed: int, lengths: tuple[int, ...] = (5, 9, 13, 17)) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [0] + [rng.randrange(4, VOCAB_SIZE) for _ in range(lengths[i % len(lengths)] - 1)] for i in range(n)
    ]


def make_llm(base: Path, spec: dict[str, Any] | None = None, **overrides: Any) -> LLM:
    config = dict(CPU)
    config.update(overrides)
    return LLM(str(base), speculative_config=spec, **config)


def ngram(k: int = 4, **extra: Any) -> dict[str, Any]:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "min_acceptance_rate": 0.0, **extra}  # fmt: skip


def key(request: Request) -> tuple[Any, ...]:
    return (tuple(request.prompt_token_ids), request.lora.lora_name if request.lora else None, request.index)


class ScriptedProposer:
    """Drafts the continuation a run without speculation produced (by prompt, adapter and sample index).
    Every `wrong_every`-th proposal has one token changed, at a position that moves from call to call;
    wrong_every=1 with wrong_all: every token wrong (nothing is ever accepted)."""

    def __init__(self, continuations: dict[tuple[Any, ...], list[int]], wrong_every: int = 0,
                 wrong_all: bool = False) -> None:  # fmt: skip
        self.continuations = continuations
        self.wrong_every, self.wrong_all = wrong_every, wrong_all
        self.calls = 0

    def propose(self, requests: list[Request], max_lens: list[int]) -> list[list[int]]:
        out = []
        for request, k in zip(requests, max_lens, strict=True):
            done = request.num_output_tokens
            drafts = list(self.continuations[key(request)][done : done + k])
            self.calls += 1
            if self.wrong_all:
                drafts = [(t + 1) % VOCAB_SIZE for t in drafts]
            elif drafts and self.wrong_every and self.calls % self.wrong_every == 0:
                j = (self.calls // self.wrong_every) % len(drafts)
                drafts[j] = (drafts[j] + 1) % VOCAB_SIZE
            out.append(drafts)
        return out

    def retain(self, running: list[Request]) -> None:
        pass


def continuations(llm: LLM, outs: list[Any], ps: list[list[int]], names: list[str | None]) -> dict:
    return {
        (tuple(p), name, c.index): list(c.token_ids)
        for p, name, o in zip(ps, names, outs, strict=True)
        for c in o.outputs
    }
