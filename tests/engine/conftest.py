"""Fixtures shared by the CPU engine tests that run the demo model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.demo import write_demo_model


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """One torch thread: the tiny model's steps are quicker, and timing noise from the 2-core box less."""
    yield from _one_thread()


@pytest.fixture(scope="module")
def one_torch_thread_for_module():
    """one_torch_thread for a whole module, its module-scoped models included (tiny shapes on a shared
    2-core box: a second intra-op thread only adds spin-waiting)."""
    yield from _one_thread()
