"""Shared pytest setup: GPU-only tests are reported as skipped, with the reason, on machines without CUDA."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the accelerator machine (benchmarks/README)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
