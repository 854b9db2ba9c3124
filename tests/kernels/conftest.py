"""Kernel tests: on a machine without CUDA the Triton kernels run in Triton's interpreter.

Triton picks interpreter-or-compiler when a `@triton.jit` function is *decorated* (its own library
functions such as `tl.zeros` and `tl.max` included), and an interpreted kernel cannot call a compiled-mode
one. Other test folders may already have imported triton in compiled mode (engine/ops.py imports
kernels/), so on CPU this file drops triton's Python modules and our kernel modules from sys.modules and
imports them again with TRITON_INTERPRET=1, then puts the variable back as it was: subprocesses and
later-collected folders never see it, and on CPU every import of triton after this point gets the
interpreter-mode copy, the only one that can run there. On a GPU nothing here happens.
tests/kernels/test_interpreter_scope.py checks both import orders.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

KERNEL_MODULES = ("kernels.lora", "kernels.attention", "kernels.fused")
ON_GPU = torch.cuda.is_available()
INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")


def import_kernels_interpreted() -> None:
    """(Re)import triton and our kernels in interpreter mode, leaving TRITON_INTERPRET as it was."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in list(sys.modules):
            ours = name == "kernels" or name.startswith("kernels.")
            # triton._C holds the compiled extension, which cannot be loaded twice; it has no jit functions.
            theirs = (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C")
            if ours or theirs:
                del sys.modules[name]
        # Imported lazily by triton's launcher otherwise, when the variable is gone again: it checks the mode.
        importlib.import_module("triton.experimental.gluon")
        for name in KERNEL_MODULES:
            importlib.import_module(name)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


if not ON_GPU:
    import_kernels_interpreted()


@pytest.fixture
def device() -> str:
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    # Fresh inputs on every run; the seed is printed so a failure (its captured stdout) can be replayed
    # with KERNEL_TEST_SEED=<seed>.
    seed = int(os.environ.get("KERNEL_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    print(f"KERNEL_TEST_SEED={seed}")
    torch.manual_seed(seed)
