"""The engine's real calls into the kernels, on CPU: the model runner with the Triton kernels (interpreted)
must give the same logits as with the references, for a batch mixing adapters of different ranks and
targets, base-model tokens, a chunked prefill over cached KV, and decodes.

This checks the seam (shapes, strides, views, dtypes and the LoRA metadata the runner hands over) in CI;
tests/engine/test_gpu_engine.py does the same on a GPU against transformers + PEFT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engine.adapter_cache import AdapterCache
from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.ops import Ops
from engine.request import LoRARequest, Request
from engine.sampling_params import SamplingParams
from tests.helpers.hf_models import ALL_TARGETS, make_peft_adapter, make_tiny_model
from tests.kernels.conftest import ON_GPU

pytestmark = pytest.mark.skipif(ON_GPU, reason="on a GPU, tests/engine/test_gpu_engine.py covers this")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("seam")
    base = make_tiny_model(root / "base", "llama", num_hidden_layers=1)
    adapters = {
        "all8": make_peft_adapter(base, root / "all8", r=8, target_modules=ALL_TARGETS, seed=1),
        "qv4": make_peft_adapter(base, root / "qv4", r=4, target_modules=("q_proj", "v_proj"), seed=2),
    }
    return base, adapters


def interpreted_triton_ops(calls: dict[str, int]) -> Ops:
    # The kernel modules conftest.py imported in interpreter mode (engine/ops.py may hold older copies).
    lora, attention = sys.modules["kernels.lora"], sys.modules["kernels.attention"]
    fused = sys.modules["kernels.fused"]

    def counted(fn):
        def call(*args, **kwargs):
            calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
            return fn(*args, **kwargs)

        return call

    fns = (
        lora.lora_shrink,
        lora.lora_expand,
        attention.write_kv,
        attention.paged_attention,
        fused.rms_norm,
        fused.rope_write_kv,
        fused.silu_mul,
    )
    return Ops("triton", *(counted(f) for f in fns))


def run_steps(base: Path, adapters: dict[str, Path], ops: Ops | None) -> list[torch.Tensor]:
    config = EngineConfig(
        model=str(base), device="cpu", dtype="float32", block_size=4, num_kv_blocks=32, max_loras=2,
        max_cpu_loras=2, max_lora_rank=8, kernel_backend="ref",
    )  # fmt: skip
    loaded = load_model(config)
    runner = ModelRunner(config, loaded, AdapterCache.for_model(config, loaded))
    if ops is not None:
        runner.ops = ops
    slots = {}
    for name, path in adapters.items():
        lora = LoRARequest(name, str(path))
        slot = runner.adapter_cache.acquire(lora)
        if slot is None:
            runner.adapter_cache.wait_for_loads(timeout=60)
            slot = runner.adapter_cache.acquire(lora)
        assert slot is not None
        slots[name] = slot
    gen = torch.Generator().manual_seed(3)
    reqs, next_block = [], 1
    for i, name in enumerate(["all8", None, "qv4"]):
        prompt = [0, *torch.randint(4, 500, (6 + 3 * i,), generator=gen).tolist()]
        req = Request(request_id=str(i), prompt_token_ids=prompt, params=SamplingParams(temperature=0.0))
        req.lora_slot = -1 if name is None else slots[name]
        req.block_table = list(range(next_block, next_block + 6))
        next_block += 6
        reqs.append(req)
    logits = []
    # A chunked first step (5 tokens each), the rest of the prompts, then two decode steps.
    for step in range(4):
        batch = [(r, 5 if step == 0 else r.num_tokens - r.num_computed_tokens) for r in reqs]
        out = runner.execute(batch)
        for req, n in batch:
            req.num_computed_tokens += n
        if step >= 1:
            for req, row in zip(reqs, out, strict=True):
                req.append_token(int(row.argmax()))
        logits.append(out.clone())
    return logits


def test_runner_with_triton_kernels_matches_references(models):
    base, adapters = models
    want = run_steps(base, adapters, None)
    calls: dict[str, int] = {}
    got = run_steps(base, adapters, interpreted_triton_ops(calls))
    # 4 steps x 1 layer: attention and RoPE + KV write once per step, RMSNorm twice per layer plus the final
    # one, LoRA for all four module groups; the plain KV write is no longer called by the model.
    want_calls = {"rope_write_kv": 4, "paged_attention": 4, "lora_shrink": 16, "lora_expand": 16}
    assert calls == {**want_calls, "rms_norm": 12, "silu_mul": 4}, calls
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0, msg=f"step {step}")
