"""loraplex inference engine: one base model, many LoRA adapters in the same batches."""

from engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError
from engine.config import EngineConfig
from engine.engine import EngineStats, LLMEngine
from engine.llm import LLM
from engine.request import CompletionOutput, LoRARequest, RequestOutput
from engine.sampling_params import SamplingParams

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
