"""Deterministic mode on CPU: a request gives the same tokens and the same logprob bits alone, in a batch
mixing adapters, prompt lengths and chunked prefill, and from run to run (docs/quantization.md).

The CPU BLAS picks its kernel from the batch shape (a [1, K] product rounds differently from a [5, K]
one), so without deterministic mode the bits of a request's logprobs follow its batch; the last test
shows that on this machine (and skips where the BLAS happens to agree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import LLM, LoRARequest, SamplingParams
from tests.helpers.fp8_checkpoint import write_fp8_checkpoint
from tests.helpers.hf_models import ALL_TARGETS, make_peft_adapter, make_tiny_model

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=4)
TARGET = [0, 17, 99, 240, 31, 7, 8]
OTHERS = [[0, 5, 6, 7, 300, 301, 302, 303, 12, 13, 14], [0, 400, 8], [0, 44, 45, 46, 47]]


pytestmark = pytest.mark.usefixtures("one_torch_thread_for_module")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("det")
    base = make_tiny_model(root / "base", "llama", hidden_size=96, intermediate_size=160)
    adapters = {
        "a": make_peft_adapter(base, root / "a", r=4, target_modules=ALL_TARGETS, seed=1),
        "b": make_peft_adapter(base, root / "b", r=8, target_modules=("q_proj", "v_proj"), seed=2),
    }
    return base, adapters


def run_target(base: Path, adapters: dict[str, Path], mixed: bool, **config: Any) -> tuple[list[int], Any]:
    """The target request's (tokens, logprobs), alone or between three others with other adapters."""
    defaults: dict[str, Any] = {"device": "cpu", "dtype": "float32", "block_size": 4, "num_kv_blocks": 64}
    llm = LLM(str(base), max_lora_rank=8, max_num_batched_tokens=12, **{**defaults, **config})
    lora_a = LoRARequest("a", str(adapters["a"]))
    if not mixed:
        out = llm.generate([TARGET], PARAMS, lora_request=lora_a)[0].outputs[0]
        return list(out.token_ids), out.logprobs
    prompts = [OTHERS[0], TARGET, OTHERS[1], OTHERS[2]]
    loras = [LoRARequest("b", str(adapters["b"])), lora_a, None, lora_a]
    out = llm.generate(prompts, PARAMS, lora_request=loras)[1].outputs[0]
    return list(out.token_ids), out.logprobs


def _bits(logprobs: Any) -> list[list[tuple[int, float]]]:
    """Every (token, logprob) of every step, as exact floats (== on floats compares every bit here)."""
    return [sorted(step.items()) for step in logprobs]


def test_alone_mixed_and_again_are_identical(model: tuple[Path, dict[str, Path]]) -> None:
    base, adapters = model
    alone = run_target(base, adapters, mixed=False, deterministic=True)
    mixed = run_target(base, adapters, mixed=True, deterministic=True)
    again = run_target(base, adapters, mixed=True, deterministic=True)
    assert alone[0] == mixed[0] == again[0]
    assert _bits(alone[1]) == _bits(mixed[1]) == _bits(again[1])


def test_fp8_deterministic_alone_and_mixed(model: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    base, adapters = model
    fp8 = write_fp8_checkpoint(base, tmp_path / "fp8")
    alone = run_target(fp8, adapters, mixed=False, deterministic=True)
    mixed = run_target(fp8, adapters, mixed=True, deterministic=True)
    assert alone[0] == mixed[0] and _bits(alone[1]) == _bits(mixed[1])


def test_deterministic_changes_no_tokens(model: tuple[Path, dict[str, Path]]) -> None:
    """Same tokens as the default mode (float32 here: only the last bits may move)."""
    base, adapters = model
    assert (
        run_target(base, adapters, mixed=True, deterministic=True)[0]
        == run_target(base, adapters, mixed=True)[0]
    )


def test_default_mode_is_batch_dependent_here(model: tuple[Path, dict[str, Path]]) -> None:
    """What deterministic mode fixes: without it, the logprob bits follow the batch on this CPU."""
    base, adapters = model
    alone = run_target(base, adapters, mixed=False)
    mixed = run_target(base, adapters, mixed=True)
    if _bits(alone[1]) == _bits(mixed[1]):
        pytest.skip("this CPU's BLAS gives the same bits for these batch shapes")
    assert alone[0] == mixed[0]  # tokens agree all the same (float32, no near-ties)


@pytest.mark.slow
def test_triton_kernels_in_deterministic_launches(model: tuple[Path, dict[str, Path]]) -> None:
    """The Triton path's fixed launches (LoRA without split-K, attention without a split) run in the
    engine and give the reference path's tokens. The interpreter's products are numpy's, so the bits
    are checked on a GPU (test_deterministic_gpu.py), not here."""
    base, adapters = model
    ref = run_target(base, adapters, mixed=True, deterministic=True)
    triton = run_target(base, adapters, mixed=True, deterministic=True, kernel_backend="triton")
    assert triton[0] == ref[0]
