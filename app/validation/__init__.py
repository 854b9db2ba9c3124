"""Validation of uploaded LoRA adapters: pure Python and numpy, never torch, never pickle."""

from .adapter import ValidatedAdapter, validate_adapter
from .base_model import BaseModelError, BaseModelSpec, load_base_model_spec, spec_from_config
from .errors import AdapterRejected
from .lora_config import LoraSpec
from .sniff import refuse_by_name

__all__ = [
    "AdapterRejected",
    "BaseModelError",
    "BaseModelSpec",
    "LoraSpec",
    "ValidatedAdapter",
    "load_base_model_spec",
    "refuse_by_name",
    "spec_from_config",
    "validate_adapter",
]
