"""One tensor-parallel rank's model: the checkpoint read whole, each tensor cut to this rank's part as it
is read (engine/parallel/sharding.py), then moved to the rank's device."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from engine.config import EngineConfig
from engine.model_config import ModelConfig
from engine.model_loader import LoadedModel, iter_weights, load_config, resolve_device, resolve_dtype
from engine.models import MODEL_REGISTRY
from engine.parallel.group import TPGroup
from engine.parallel.sharding import Shard, check_shardable, lora_rows
from engine.tokenizer import load_tokenizer


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """cuda:<rank> on CUDA (one GPU per rank), else the CPU."""
    device = resolve_device(config.device)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if config.tensor_parallel_size > count:
        raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} but only {count} CUDA devices")
    return torch.device("cuda", rank)


# (whole model config, device) -> (HF name, tensor) of every weight: a stand-in for the checkpoint (the
# benchmarks' random weights); a module-level function or partial, so that it reaches spawned workers.
WeightSource = Callable[[ModelConfig, torch.device], Iterable[tuple[str, Tensor]]]


def load_rank(
    config: EngineConfig, group: TPGroup, with_tokenizer: bool, weights: WeightSource | None = None
) -> tuple[LoadedModel, Shard]:
    """This rank's LoadedModel: its `config` is the rank's (local heads, MLP width; the whole vocabulary
    size), its model the rank's part; plus the Shard that cut it. weights: instead of the folder's."""
    full = load_config(config.model)
    check_shardable(full, group.size)
    rows = lora_rows(config.max_lora_rank, group.size, config.fully_sharded_loras)
    shard = Shard(full, group.rank, group.size, rows)
    dtype = resolve_dtype(config.dtype, group.device)
    model_cls = MODEL_REGISTRY[full.architecture].model
    source = iter_weights(config.model) if weights is None else weights(full, group.device)
    model = model_cls.from_weights(full, source, dtype, group.device, shard, group)
    loaded = LoadedModel(
        name=Path(config.model).resolve().name,
        path=str(config.model),
        config=shard.local_config(),
        model=model,
        tokenizer=load_tokenizer(config.model) if with_tokenizer else None,
        device=group.device,
        dtype=dtype,
    )
    return loaded, shard
