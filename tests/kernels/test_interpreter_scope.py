"""The interpreter switch in tests/conftest.py: on CPU, TRITON_INTERPRET is set before triton is first
imported, so the kernels are interpreted whichever test folder imports them first, and triton is never
imported twice (nothing is deleted from sys.modules)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.kernels.conftest import ON_GPU

pytestmark = pytest.mark.skipif(ON_GPU, reason="the interpreter is only used on machines without CUDA")
REPO = Path(__file__).resolve().parents[2]


def test_kernels_are_interpreted_in_this_session():
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    import kernels.attention
    import kernels.lora

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert isinstance(kernels.lora._shrink_kernel, InterpretedFunction)
    assert isinstance(kernels.attention._attention_kernel, InterpretedFunction)
    # The kernels' triton is the one module this process imported, never a second copy.
    assert sys.modules["triton"] is triton


@pytest.mark.slow  # a fresh interpreter importing torch and triton: ~7 s here
def test_engine_first_import_order_gets_interpreted_kernels_that_run():
    # What happens when tests/engine (collected before tests/kernels) imports kernels through engine/ops.py:
    # a fresh interpreter without the variable, which only the root conftest sets.
    script = textwrap.dedent(
        """
        import os, sys, torch
        import tests.conftest  # what pytest loads first
        import engine.ops  # imports the kernels, as tests/engine does
        from triton.runtime.interpreter import InterpretedFunction
        from kernels.lora import _shrink_kernel, lora_shrink, lora_shrink_ref, make_lora_meta
        assert isinstance(_shrink_kernel, InterpretedFunction)
        x, a = torch.randn(5, 16), torch.randn(2, 16, 16)
        meta = make_lora_meta(torch.tensor([1, 0, -1, 1, 1], dtype=torch.int32), 2)
        out, ref = torch.empty(1, 5, 16), torch.empty(1, 5, 16)
        lora_shrink(x, [a], meta, out)
        lora_shrink_ref(x, [a], meta, ref)
        torch.testing.assert_close(out, ref)
        print("ok", os.environ.get("TRITON_INTERPRET"))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "1"]
