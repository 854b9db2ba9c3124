"""The engine's calls into the Triton kernels (interpreted on CPU) for the families that use the window,
the soft-cap and q/k norms: the runner's logits equal the reference kernels' over a chunked prefill on
cached KV and decodes, prompts longer than the window, adapters mixed with base rows."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.hf_families import make_family_model
from tests.helpers.hf_models import ALL_TARGETS, make_peft_adapter
from tests.kernels.conftest import ON_GPU
from tests.kernels.test_engine_seam import interpreted_triton_ops, run_steps

# slow: ~25 s a family in the interpreter.
pytestmark = [
    pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels run compiled in the engine tests"),
    pytest.mark.slow,
]

FAMILIES = {
    "gemma2": {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
    "gemma3": {},
}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_runner_with_window_kernels_matches_references(arch, tmp_path):
    extra = {"query_pre_attn_scalar": 24, "hidden_activation": "gelu_pytorch_tanh"} if "gemma" in arch else {}
    base = make_family_model(tmp_path / "base", arch, sliding_window=4, **extra, **FAMILIES[arch])
    adapters = {
        "all8": make_peft_adapter(base, tmp_path / "all8", r=8, target_modules=ALL_TARGETS, seed=1),
        "qv4": make_peft_adapter(base, tmp_path / "qv4", r=4, target_modules=("q_proj", "v_proj"), seed=2),
    }
    want = run_steps(base, adapters, None)
    calls: dict[str, int] = {}
    got = run_steps(base, adapters, interpreted_triton_ops(calls))
    assert calls["paged_attention"] == 4 * 2  # 4 steps x 2 layers, all through the kernel
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0, msg=f"step {step}")
