"""Kernel tests: on a machine without CUDA the Triton kernels run in Triton's interpreter.

Triton decides interpreter-or-compiler when a `@triton.jit` function is *decorated*, so the variable is
set only while the kernel modules are (re)imported here, then restored: kernels imported earlier by other
test folders (through engine/ops.py) are reloaded in interpreter mode, and nothing else in this pytest
process sees TRITON_INTERPRET. tests/kernels/test_interpreter_scope.py checks that.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

KERNEL_MODULES = ("kernels.lora", "kernels.attention")
ON_GPU = torch.cuda.is_available()


def _import_kernels_interpreted() -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in KERNEL_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
            else:
                importlib.import_module(name)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


if not ON_GPU:
    _import_kernels_interpreted()


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
