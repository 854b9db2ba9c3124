"""The engine on CUDA through the Triton kernels against transformers + PEFT on the same GPU (GPU only).

- float32: greedy tokens equal PEFT's, token for token, for a batch that mixes four adapters (ranks 4-16,
  different target sets, rank/alpha patterns) with base-model requests, with decode CUDA graphs on and off.
- bfloat16: last-token logits after a mixed prefill. Tolerance, stated: the engine's distance to the
  float32 oracle is at most twice PEFT-in-bfloat16's own distance to it, plus 1e-3 of the oracle's norm
  (two bf16 implementations round in different places; neither should be much worse than the other).
- Triton vs the torch references inside the engine, same GPU, float32: logits within 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.adapter_cache import AdapterCache
from engine.config import EngineConfig
from engine.llm import LLM
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.request import LoRARequest, Request
from engine.sampling_params import SamplingParams
from tests.helpers.hf_models import ALL_TARGETS, load_hf, make_peft_adapter, make_tiny_model

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
NAMES: list[str | None] = ["all16", None, "qv8", "mlp4", "pattern", "all16", None, "qv8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("gpu_engine")
    # Head dim 64 and 4:1 GQA like the real models the kernels are tuned for, still small.
    base = make_tiny_model(
        root / "base", "llama", hidden_size=256, intermediate_size=512, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, num_hidden_layers=3,
    )  # fmt: skip
    adapters = {
        "all16": make_peft_adapter(base, root / "all16", r=16, target_modules=ALL_TARGETS, seed=1),
        "qv8": make_peft_adapter(base, root / "qv8", r=8, target_modules=("q_proj", "v_proj"), seed=2),
        "mlp4": make_peft_adapter(base, root / "mlp4", r=4, target_modules=("gate_proj", "down_proj"), seed=3),
        "pattern": make_peft_adapter(
            base, root / "pattern", r=12, target_modules=("k_proj", "o_proj", "up_proj"),
            rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 32}, seed=4,
        ),
    }  # fmt: skip
    return base, adapters


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [[0, *torch.randint(4, 512, (4 + 5 * i,), generator=gen).tolist()] for i in range(len(NAMES))]


@torch.no_grad()
def peft_greedy(model, prompt: list[int], name: str | None, steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        logits = model(
            input_ids=torch.tensor([ids], device=DEVICE), adapter_names=[name or "__base__"]
        ).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("ahead", [True, False], ids=["async", "sync"])
def test_fp32_greedy_tokens_equal_peft(models, cuda_graphs, ahead):
    """Async scheduling and the LoRA shrink's side stream on and off (the stream is on in all four)."""
    base, adapters = models
    llm = LLM(
        str(base), device=DEVICE, dtype="float32", max_loras=4, max_cpu_loras=4, max_lora_rank=16,
        num_kv_blocks=256, kernel_backend="triton", cuda_graphs=cuda_graphs, enable_prefix_caching=False,
        async_scheduling=ahead,
    )  # fmt: skip
    assert llm.engine.runner.lora_stream is not None
    loras = [None if n is None else LoRARequest(n, str(adapters[n])) for n in NAMES]
    steps = 12
    outs = llm.generate(prompts(), SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True), loras)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert (llm.engine.num_steps_ahead > 0) == ahead
    if cuda_graphs:
        assert (llm.engine.runner.graphs.ahead_steps > 0) == ahead
    hf = load_hf(base, adapters).to(DEVICE)
    want = [peft_greedy(hf, p, n, steps) for p, n in zip(prompts(), NAMES, strict=True)]
    assert got == want
    # Positive control: the adapters really change what the model says.
    assert got[0] != peft_greedy(hf, prompts()[0], None, steps)


def test_seeded_sampling_is_the_same_with_async_scheduling(models):
    """On CUDA the sampling parameters reach the device through pinned copies and the draws stay there:
    seeded temperature / top-k / top-p sampling gives the same text with async scheduling on and off."""
    base, adapters = models
    loras = [None if n is None else LoRARequest(n, str(adapters[n])) for n in NAMES]
    # Different lengths: requests stop while others run, so steps ahead gather the remaining rows' tokens.
    params = [
        SamplingParams(
            max_tokens=6 + i, temperature=0.9, top_k=[0, 40][i % 2], top_p=[1.0, 0.9][i % 2], seed=i
        )
        for i in range(len(NAMES))
    ]
    got = []
    for ahead in (True, False):
        llm = LLM(
            str(base), device=DEVICE, dtype="float32", max_loras=4, max_cpu_loras=4, max_lora_rank=16,
            num_kv_blocks=256, kernel_backend="triton", async_scheduling=ahead,
        )  # fmt: skip
        outs = llm.generate(prompts(), params, loras)
        got.append([list(o.outputs[0].token_ids) for o in outs])
        assert (llm.engine.num_steps_ahead > 0) == ahead
        llm.engine.close()
    assert got[0] == got[1]


def make_runner(base: Path, dtype: str, backend: str) -> ModelRunner:
    config = EngineConfig(
        model=str(base), device=DEVICE, dtype=dtype, block_size=16, num_kv_blocks=128, max_loras=4,
        max_cpu_loras=4, max_lora_rank=16, kernel_backend=backend, cuda_graphs=False,
    )  # fmt: skip
    loaded = load_model(config)
    return ModelRunner(config, loaded, AdapterCache.for_model(config, loaded))


def prefill_logits(runner: ModelRunner, adapters: dict[str, Path]) -> torch.Tensor:
    """Every prompt in one step, with its adapter: float32 logits [B, V] of each last token."""
    cache = runner.adapter_cache
    slots = {}
    for name, path in adapters.items():
        lora = LoRARequest(name, str(path))
        slot = cache.acquire(lora)
        if slot is None:
            cache.wait_for_loads(timeout=60)
            slot = cache.acquire(lora)
        assert slot is not None
        slots[name] = slot
    batch, next_block = [], 1
    for i, (p, name) in enumerate(zip(prompts(), NAMES, strict=True)):
        req = Request(request_id=str(i), prompt_token_ids=p, params=SamplingParams(temperature=0.0))
        req.lora_slot = -1 if name is None else slots[name]
        blocks = -(-len(p) // runner.block_size)
        req.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        batch.append((req, len(p)))
    return runner.execute(batch).float()


@torch.no_grad()
def peft_last_logits(model, dtype: torch.dtype) -> torch.Tensor:
    rows = []
    for p, name in zip(prompts(), NAMES, strict=True):
        out = model(input_ids=torch.tensor([p], device=DEVICE), adapter_names=[name or "__base__"])
        rows.append(out.logits[0, -1].float())
    return torch.stack(rows)


def test_bf16_logits_within_stated_tolerance_of_peft(models):
    base, adapters = models
    got = prefill_logits(make_runner(base, "bfloat16", "triton"), adapters)
    hf = load_hf(base, adapters).to(DEVICE)
    oracle = peft_last_logits(hf, torch.float32)
    hf_bf16 = peft_last_logits(hf.to(torch.bfloat16), torch.bfloat16)
    ours = (got - oracle).norm(dim=1)
    theirs = (hf_bf16 - oracle).norm(dim=1)
    bound = 2 * theirs + 1e-3 * oracle.norm(dim=1)
    assert torch.all(ours <= bound), f"engine bf16 error {ours.tolist()} vs bound {bound.tolist()}"


def test_triton_and_reference_backends_agree_on_gpu(models):
    base, adapters = models
    triton_logits = prefill_logits(make_runner(base, "float32", "triton"), adapters)
    ref_logits = prefill_logits(make_runner(base, "float32", "ref"), adapters)
    torch.testing.assert_close(triton_logits, ref_logits, atol=1e-4, rtol=0)
