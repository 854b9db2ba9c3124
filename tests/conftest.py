"""Shared pytest setup: Triton's interpreter on machines without CUDA (set before triton is first imported),
and GPU-only tests reported as skipped, with the reason, there."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _interpret_triton_on_cpu() -> None:
    """Without CUDA, Triton kernels can only run in Triton's interpreter, and Triton picks interpreter or
    compiler when each `@triton.jit` function is decorated (its own `tl.*` helpers included), which is
    at import. So the mode is set here, before anything imports triton (this file is loaded before any
    test module), for the whole session and its subprocesses: every import of triton or of our kernels
    (tests/kernels directly, tests/engine through engine/ops.py) gets the one mode that can run."""
    if _has_cuda():
        return
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError(
            "triton was imported in compiled mode before tests/conftest.py on a CPU machine"
        )
    os.environ["TRITON_INTERPRET"] = "1"


_interpret_triton_on_cpu()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the accelerator machine (benchmarks/README)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
