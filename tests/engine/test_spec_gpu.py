"""Speculative decoding on CUDA with the Triton kernels and CUDA graphs (GPU only): float32 greedy tokens
with speculation (n-gram, padded uniform verify steps replayed from graphs; and a draft model) equal those
without, on a batch mixing adapters and base requests; verify buckets are captured and replayed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from tests.helpers.hf_models import ALL_TARGETS, make_peft_adapter, make_tiny_model

pytestmark = pytest.mark.gpu
NAMES: list[str | None] = ["all8", None, "qv4", None, "all8", "qv4"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("spec_gpu")
    shape = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
             "head_dim": 64}  # fmt: skip
    base = make_tiny_model(root / "base", "llama", num_hidden_layers=3, **shape)
    adapters = {
        "all8": make_peft_adapter(base, root / "all8", r=8, target_modules=ALL_TARGETS, seed=1),
        "qv4": make_peft_adapter(base, root / "qv4", r=4, target_modules=("q_proj", "v_proj"), seed=2),
    }
    return base, adapters


def run(base: Path, adapters: dict[str, Path], spec: dict | None) -> tuple[LLM, list[list[int]]]:
    llm = LLM(str(base), device="cuda", dtype="float32", max_lora_rank=8, max_num_seqs=16, num_kv_blocks=256,
              speculative_config=spec)  # fmt: skip
    graphs = llm.engine.runner.graphs
    assert graphs is not None
    replay = graphs.replay
    llm.replayed = []  # type: ignore[attr-defined]

    def record(key, *args, **kwargs):
        llm.replayed.append(key)  # type: ignore[attr-defined]
        return replay(key, *args, **kwargs)

    graphs.replay = record
    gen = torch.Generator().manual_seed(3)
    ps = [[0, *torch.randint(4, 512, (6 + 3 * i,), generator=gen).tolist()] for i in range(len(NAMES))]
    lr = [LoRARequest(n, str(adapters[n])) if n else None for n in NAMES]
    outs = llm.generate(ps, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), lora_request=lr)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_with_speculation_equals_without_on_cuda(models, method):
    base, adapters = models
    _, expected = run(base, adapters, None)
    spec = {"method": method, "num_speculative_tokens": 3, "min_acceptance_rate": 0.0}
    if method == "ngram":
        spec.update(prompt_lookup_min=1, prompt_lookup_max=3)
    else:
        spec["model"] = str(base)  # the target as its own draft: whole runs accepted on base rows
    llm, got = run(base, adapters, spec)
    assert got == expected
    engine = llm.engine
    assert engine.spec.pad and engine.spec.stats.num_accepted_tokens > 0
    assert 4 in engine.runner.graphs.verify
    assert any(key[2] == 4 for key in llm.replayed)  # verify steps replayed a k + 1 = 4 bucket


def test_seeded_sampling_gives_the_same_text_on_cuda(models):
    """A seeded request's CUDA generator is rewound past the rows it did not emit (Philox offsets)."""
    base, _ = models
    gen = torch.Generator().manual_seed(4)
    ps = [[0, *torch.randint(4, 512, (8,), generator=gen).tolist()] for _ in range(3)]
    params = [SamplingParams(max_tokens=20, temperature=0.8, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    outs = []
    for spec in (None, {"method": "draft_model", "model": str(base), "num_speculative_tokens": 3,
                        "min_acceptance_rate": 0.0}):  # fmt: skip
        llm = LLM(
            str(base),
            device="cuda",
            dtype="float32",
            max_lora_rank=8,
            num_kv_blocks=256,
            speculative_config=spec,
        )
        outs.append([o.outputs[0].token_ids for o in llm.generate(ps, params)])
        if spec is not None:
            assert llm.engine.spec.stats.num_accepted_tokens > 0
    assert outs[0] == outs[1]
