"""Qwen3 (dense): Llama's layer with an RMSNorm over each q and k head before RoPE, and no q/k/v bias."""

from __future__ import annotations

from typing import Any

from engine.models.family import Family
from engine.models.llama import qwen_window


def _qwen3(raw: dict[str, Any]) -> dict[str, Any]:
    return {**qwen_window(raw), "qk_norm": True}


QWEN3 = Family("qwen3", _qwen3)
