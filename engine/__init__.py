"""loraplex inference engine: one base model, many LoRA adapters in the same batches.

The names below are loaded on first use, so `import engine.request` (and the other public types the API
types its side of the seam with) never pulls in torch: only touching `engine.LLM` and the like does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError
    from engine.config import EngineConfig
    from engine.engine import EngineStats, LLMEngine
    from engine.llm import LLM
    from engine.request import CompletionOutput, LoRARequest, RequestOutput
    from engine.sampling_params import SamplingParams

# public name -> the module that defines it
_HOMES = {
    "LLM": "engine.llm",
    "AsyncLLMEngine": "engine.async_engine",
    "CompletionOutput": "engine.request",
    "EngineConfig": "engine.config",
    "EngineDeadError": "engine.async_engine",
    "EngineStats": "engine.engine",
    "LLMEngine": "engine.engine",
    "LoRARequest": "engine.request",
    "RequestFailedError": "engine.async_engine",
    "RequestOutput": "engine.request",
    "SamplingParams": "engine.sampling_params",
}

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "EngineStats",
    "LLMEngine",
    "LoRARequest",
    "RequestFailedError",
    "RequestOutput",
    "SamplingParams",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value
