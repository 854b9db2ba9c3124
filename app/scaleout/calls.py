"""What the API tier sends an engine replica for one request; pickled by Ray, so plain dataclasses.

No tenant's name travels: the adapter goes by its content hash (the multiplexed model id) and the bytes
of its two files come as a Ray object reference, fetched by a replica only when it does not hold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class AdapterFilesRef:
    content_hash: str  # sha256 of the weights file: the engine's key and the multiplexed model id
    files: Any  # ray.ObjectRef to {file name: bytes} of adapter_config.json and the weights


@dataclass(frozen=True, slots=True)
class EngineCall:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: AdapterFilesRef | None
    cache_salt: str
    fairness_key: str


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the API tier needs from the engine besides its tokenizer (the same on every replica)."""

    model_name: str
    max_model_len: int
    vocab_size: int
    max_loras: int
