"""The interpreter switch in conftest.py: kernels really run interpreted on CPU, in either import order,
and TRITON_INTERPRET does not stay set for the rest of the process or its subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.kernels.conftest import INTERPRET_BEFORE, ON_GPU

pytestmark = pytest.mark.skipif(ON_GPU, reason="the interpreter is only used on machines without CUDA")
REPO = Path(__file__).resolve().parents[2]


def test_kernels_are_interpreted_and_variable_is_restored():
    from triton.runtime.interpreter import InterpretedFunction

    import kernels.attention
    import kernels.lora

    assert isinstance(kernels.lora._shrink_kernel, InterpretedFunction)
    assert isinstance(kernels.attention._attention_kernel, InterpretedFunction)
    assert os.environ.get("TRITON_INTERPRET") == INTERPRET_BEFORE


def test_kernels_imported_in_compiled_mode_first_still_run_after_the_switch():
    # What happens when tests/engine (collected before tests/kernels) imported kernels through engine/ops.py.
    script = textwrap.dedent(
        """
        import os, subprocess, sys, torch
        import kernels.lora  # compiled mode: TRITON_INTERPRET is unset
        from triton.runtime.jit import JITFunction
        assert isinstance(kernels.lora._shrink_kernel, JITFunction)
        from tests.kernels.conftest import import_kernels_interpreted
        import_kernels_interpreted()
        from kernels.lora import lora_shrink, lora_shrink_ref, make_lora_meta
        x, a = torch.randn(5, 16), torch.randn(2, 16, 16)
        meta = make_lora_meta(torch.tensor([1, 0, -1, 1, 1], dtype=torch.int32), 2)
        out, ref = torch.empty(1, 5, 16), torch.empty(1, 5, 16)
        lora_shrink(x, [a], meta, out)
        lora_shrink_ref(x, [a], meta, ref)
        torch.testing.assert_close(out, ref)
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('TRITON_INTERPRET'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
        print("ok", os.environ.get("TRITON_INTERPRET"), child)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "None", "None"]
