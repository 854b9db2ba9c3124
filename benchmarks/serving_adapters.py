"""Seeded PEFT adapters for the serving benchmark, made on demand instead of stored.

A thousand rank-16 Llama-3-8B adapters are ~27 GB; the benchmark never keeps them all. Adapter i's bytes
are a pure function of (i, its target modules, the model shape), so the loader callback can delete files
(LRU) and write them again when asked, and the sha256 the engine re-checks stays the real one.

The rewrite stands in for the S3 fetch, so it must cost what a fetch costs, not more: each tensor is a
slice of a fixed bank of random values at offsets drawn from the adapter's seed, so writing an adapter is
a copy plus a file write (the time of a fetch at local-disk speed), not 13M fresh random draws (seconds
of CPU, which made the stand-in, not the engine, the limit of a cold adapter).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.lora import module_shapes
from engine.request import LoRARequest

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_SEVEN = (*QKVO, "gate_proj", "up_proj", "down_proj")
_PARENT = {m: "self_attn" for m in (*QKVO, "qkv_proj")} | {
    m: "mlp" for m in ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
}
# Phi-3 (fused checkpoints): the same projections under PEFT's fused names.
FUSED_NAMES = {QKVO: ("qkv_proj", "o_proj"), ALL_SEVEN: ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}


def shapes_of(cfg: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection an adapter of this benchmark may target, fused ones included."""
    shapes = module_shapes(cfg)
    q, kv, i = shapes["q_proj"][1], shapes["k_proj"][1], shapes["gate_proj"][1]
    return shapes | {"qkv_proj": (cfg.hidden_size, q + 2 * kv), "gate_up_proj": (cfg.hidden_size, 2 * i)}


# Values per bank: 4 Mi of bf16 (8 MB) per scale; a tensor is a slice at a seeded offset.
_BANK = 1 << 22


def random_bank(scale: float) -> torch.Tensor:
    """N(0, scale^2) values in bf16, the same every time for the same scale."""
    gen = torch.Generator().manual_seed(round(scale * 1e9))
    return (torch.randn(_BANK, generator=gen) * scale).bfloat16()


def adapter_tensors(
    cfg: Any, seed: int, rank: int, targets: tuple[str, ...], banks: dict[float, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """PEFT's saved names -> bf16 tensors, slices of `banks` (scale -> values; made when None) at offsets
    from a generator seeded with `seed`: the same bytes every time, different ones for every seed."""
    gen = torch.Generator().manual_seed(seed)
    banks = {} if banks is None else banks
    shapes = shapes_of(cfg)
    out: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_layers):
        for module in targets:
            d_in, d_out = shapes[module]
            pre = f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}"
            # B non-zero (PEFT starts it at zero, which would make the LoRA path free to get wrong).
            for name, shape, scale in (("A", (rank, d_in), d_in**-0.5), ("B", (d_out, rank), 0.02)):
                if scale not in banks:
                    banks[scale] = random_bank(scale)
                n = shape[0] * shape[1]
                start = int(torch.randint(0, _BANK - n + 1, (1,), generator=gen))
                out[f"{pre}.lora_{name}.weight"] = banks[scale][start : start + n].view(shape).clone()
    return out


class SeededAdapters:
    """Adapters `prefix-i` under `root`, at most `max_files` on disk at once (least recently used go).

    `lora(i)` returns the LoRARequest (hash computed once, by writing the file); `loader` is the engine's
    loader callback: it returns the folder, rewriting it first if it was deleted."""

    def __init__(
        self,
        root: Path,
        cfg: Any,
        rank: int,
        targets: tuple[str, ...],
        prefix: str,
        max_files: int,
        base_model: str = "",
    ) -> None:
        self.root, self.cfg, self.rank, self.targets = root, cfg, rank, targets
        self.prefix, self.max_files, self.base_model = prefix, max_files, base_model
        self.seed_base = sum(ord(c) for c in prefix) * 1_000_003
        self._hashes: dict[int, str] = {}
        self._banks = {scale: random_bank(scale) for scale in self._scales()}
        self._on_disk: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()
        self.writes = 0
        self.write_seconds = 0.0

    def _scales(self) -> set[float]:
        shapes = shapes_of(self.cfg)
        return {shapes[m][0] ** -0.5 for m in self.targets} | {0.02}

    def folder(self, i: int) -> Path:
        return self.root / f"{self.prefix}-{i}"

    def lora(self, i: int) -> LoRARequest:
        if i not in self._hashes:
            self._write(i)
        return LoRARequest(f"{self.prefix}-{i}", str(self.folder(i)), content_hash=self._hashes[i])

    def prepare(self, indices: list[int], threads: int = 8) -> None:
        """Hash (write) many adapters in parallel before a timed run; torch and sha256 release the GIL."""
        todo = sorted(set(indices) - set(self._hashes))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(self._write, todo))

    def loader(self, lora: LoRARequest) -> str:
        i = int(lora.lora_name.rsplit("-", 1)[1])
        with self._lock:
            present = i in self._on_disk
            if present:
                self._on_disk.move_to_end(i)
        if not present:
            self._write(i)
        return str(self.folder(i))

    def rewrite(self, i: int) -> float:
        """The stand-in fetch of adapter i, as the loader does it for a deleted file; returns seconds."""
        start = time.perf_counter()
        self._write(i)
        return time.perf_counter() - start

    def _write(self, i: int) -> None:
        start = time.perf_counter()
        folder = self.folder(i)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = adapter_tensors(self.cfg, self.seed_base + i, self.rank, self.targets, self._banks)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.rank,
            "lora_alpha": 2 * self.rank,
            "lora_dropout": 0.0,
            "target_modules": list(self.targets),
            "bias": "none",
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        weights = folder / "adapter_model.safetensors"
        save_file(tensors, str(weights))
        # Hashed the first time only: a rewrite is the same bytes (and the engine re-checks the hash).
        digest = self._hashes.get(i) or hashlib.sha256(weights.read_bytes()).hexdigest()
        with self._lock:
            self._hashes.setdefault(i, digest)
            self._on_disk[i] = None
            self._on_disk.move_to_end(i)
            while len(self._on_disk) > self.max_files:
                old, _ = self._on_disk.popitem(last=False)
                for f in self.folder(old).iterdir():
                    f.unlink()
            self.writes += 1
            self.write_seconds += time.perf_counter() - start

    def nbytes(self) -> int:
        """Bytes of one adapter's A and B (every layer, every target module)."""
        shapes = shapes_of(self.cfg)
        per_layer = sum(self.rank * (shapes[m][0] + shapes[m][1]) for m in self.targets)
        return per_layer * self.cfg.num_layers * 2
