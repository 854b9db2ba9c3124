"""Architecture name (config.json `architectures[0]`) -> its family. Anything else is refused.

Adding a family: one file here (its Family: model_type and config.json extras), one line below, and its
adapter targets in engine/adapter_format.py TARGET_MODULES.
"""

from __future__ import annotations

from engine.models.family import Family
from engine.models.gemma import GEMMA2, GEMMA3
from engine.models.llama import LLAMA, MISTRAL, QWEN2
from engine.models.phi3 import PHI3
from engine.models.qwen3 import QWEN3

MODEL_REGISTRY: dict[str, Family] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": MISTRAL,
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
    "Gemma2ForCausalLM": GEMMA2,
    "Gemma3ForCausalLM": GEMMA3,
    "Phi3ForCausalLM": PHI3,
}
