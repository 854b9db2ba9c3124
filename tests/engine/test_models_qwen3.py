"""Qwen3 (q/k RMSNorm per head, no q/k/v bias) against transformers + PEFT, token for token."""

from __future__ import annotations

import pytest

from engine.model_loader import load_config
from tests.helpers.hf_families import check_family, make_family_model
from tests.helpers.hf_models import ALL_TARGETS, make_peft_adapter


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_qwen3_with_two_adapters_and_a_sliding_window_on_some_layers(tmp_path):
    base = make_family_model(
        tmp_path / "base", "qwen3", num_hidden_layers=3, use_sliding_window=True, sliding_window=6,
        max_window_layers=1, tie_word_embeddings=True,
    )  # fmt: skip
    cfg = load_config(base)
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.tie_word_embeddings
    assert [cfg.window_of(i) for i in range(3)] == [None, 6, 6]
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=ALL_TARGETS, seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=2, target_modules=("k_proj", "down_proj"), seed=2),
    }
    check_family(base, adapters, lengths=(11, 17, 23))
