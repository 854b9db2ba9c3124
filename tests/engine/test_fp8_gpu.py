"""FP8 on CUDA: the projections run the FP8 product (compute capability >= 8.9), bf16 adapters on top,
CUDA graphs on; logits close to the bf16 model on the dequantized weights (activations are rounded to
FP8 here, so not equal: the relative error is printed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.quant.linear import Fp8Linear
from tests.engine.test_fp8 import PROMPTS
from tests.helpers.fp8_checkpoint import write_dequantized, write_fp8_checkpoint
from tests.helpers.hf_models import ALL_TARGETS, make_peft_adapter, make_tiny_model

pytestmark = pytest.mark.gpu

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)


def _llm(path: Path, **extra: object) -> LLM:
    return LLM(str(path), device="cuda", dtype="bfloat16", max_lora_rank=8, num_kv_blocks=256, **extra)  # type: ignore[arg-type]


def test_fp8_on_cuda_close_to_dequantized_bf16(tmp_path: Path) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 products need compute capability >= 8.9")
    base = make_tiny_model(tmp_path / "float", "llama", hidden_size=128, intermediate_size=256)
    quantized = write_fp8_checkpoint(base, tmp_path / "fp8")
    deq = write_dequantized(quantized, tmp_path / "deq")
    adapter = make_peft_adapter(deq, tmp_path / "a", r=8, target_modules=ALL_TARGETS, seed=1)
    loras = [LoRARequest("a", str(adapter)), None, LoRARequest("a", str(adapter)), None]
    fp8 = _llm(quantized)
    proj = fp8.engine.model.model.layers[0].mlp.down_proj
    assert isinstance(proj, Fp8Linear) and proj.fp8_gemm
    ours = fp8.generate(PROMPTS, PARAMS, lora_request=loras)
    ref = _llm(deq).generate(PROMPTS, PARAMS, lora_request=loras)
    same = sum(o.outputs[0].token_ids == r.outputs[0].token_ids for o, r in zip(ours, ref, strict=True))
    first = sum(
        o.outputs[0].token_ids[0] == r.outputs[0].token_ids[0] for o, r in zip(ours, ref, strict=True)
    )
    print(f"FP8 vs dequantized bf16: {same}/4 sequences identical, {first}/4 first tokens")
    assert first >= 3
    # Run to run on the same engine (same batch): the same tokens.
    again = fp8.generate(PROMPTS, PARAMS, lora_request=loras)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in ours]
