"""Kernel tests: on a machine without CUDA the Triton kernels run in Triton's interpreter.

The mode is chosen once, in tests/conftest.py, before triton is first imported (TRITON_INTERPRET=1 on
CPU); tests/kernels/test_interpreter_scope.py checks that the kernels really are interpreted whichever
test folder imported them first.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()


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
