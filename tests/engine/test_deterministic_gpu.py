"""Deterministic mode on CUDA, bf16, Triton kernels and CUDA graphs: a request alone and in a mixed
batch give the same tokens and logprob bits, and so do two identical runs (tests/engine/test_deterministic.py
is the CPU twin; there split-K atomics, the attention's split merge and cuBLAS's shape-picked
algorithms are what this mode removes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.test_deterministic import _bits, run_target
from tests.helpers.fp8_checkpoint import write_fp8_checkpoint
from tests.helpers.hf_models import ALL_TARGETS, make_peft_adapter, make_tiny_model

pytestmark = pytest.mark.gpu

CUDA = {"device": "cuda", "dtype": "bfloat16", "num_kv_blocks": 256, "block_size": 16}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("det-gpu")
    base = make_tiny_model(root / "base", "llama", hidden_size=256, intermediate_size=512)
    adapters = {
        "a": make_peft_adapter(base, root / "a", r=4, target_modules=ALL_TARGETS, seed=1),
        "b": make_peft_adapter(base, root / "b", r=8, target_modules=("q_proj", "v_proj"), seed=2),
    }
    return base, adapters


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_bf16_alone_mixed_and_again(model: tuple[Path, dict[str, Path]], cuda_graphs: bool) -> None:
    base, adapters = model
    cfg = {**CUDA, "cuda_graphs": cuda_graphs, "deterministic": True}
    alone = run_target(base, adapters, mixed=False, **cfg)
    mixed = run_target(base, adapters, mixed=True, **cfg)
    again = run_target(base, adapters, mixed=True, **cfg)
    assert alone[0] == mixed[0] == again[0]
    assert _bits(alone[1]) == _bits(mixed[1]) == _bits(again[1])


def test_fp8_deterministic_on_cuda(model: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    base, adapters = model
    fp8 = write_fp8_checkpoint(base, tmp_path / "fp8")
    cfg = {**CUDA, "deterministic": True}
    alone = run_target(fp8, adapters, mixed=False, **cfg)
    mixed = run_target(fp8, adapters, mixed=True, **cfg)
    assert alone[0] == mixed[0] and _bits(alone[1]) == _bits(mixed[1])
