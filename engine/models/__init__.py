"""Architecture name (config.json `architectures[0]`) -> our model class. Anything else is refused."""

from __future__ import annotations

from typing import Any

from engine.models.llama import LlamaForCausalLM

# Mistral and Qwen2 are Llama with a sliding-window hint and q/k/v biases: one implementation.
MODEL_REGISTRY: dict[str, Any] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
