"""Every new family on CUDA through the Triton kernels (window, soft-cap, q/k norm, fused adapters) and
the decode CUDA graphs, float32, against transformers + PEFT: the same check the CPU tests run."""

from __future__ import annotations

import pytest

from tests.helpers.hf_families import check_family, make_family_model
from tests.helpers.hf_models import ALL_TARGETS, make_peft_adapter

pytestmark = pytest.mark.gpu

GEMMA = {"sliding_window": 6, "query_pre_attn_scalar": 24, "hidden_activation": "gelu_pytorch_tanh"}
FAMILIES = {
    "qwen3": ({"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, ALL_TARGETS),
    "gemma2": ({**GEMMA, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}, ALL_TARGETS),
    "gemma3": (GEMMA, ALL_TARGETS),
    "phi3": ({"sliding_window": 12}, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "mistral": ({"sliding_window": 24}, ALL_TARGETS),
}


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_on_cuda_equals_transformers_and_peft(arch, cuda_graphs, tmp_path):
    overrides, targets = FAMILIES[arch]
    base = make_family_model(tmp_path / "base", arch, num_hidden_layers=3, **overrides)
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=targets, seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=4, target_modules=targets[:2], seed=2),
    }
    check_family(
        base, adapters, lengths=(13, 30, 41), device="cuda", kernel_backend="triton", cuda_graphs=cuda_graphs
    )
