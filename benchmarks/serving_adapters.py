"""Seeded PEFT adapters for the serving benchmark, made on demand instead of stored.

A thousand rank-16 Llama-3-8B adapters are ~27 GB; the benchmark never keeps them all. Adapter i's bytes
are a pure function of (i, its target modules, the model shape), so the loader callback can delete files
(LRU) and write them again when asked, and the sha256 the engine re-checks stays the real one.
"""

from __future__ import annotations

import hashlib
import json
import threading
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
_PARENT = {m: "self_attn" for m in QKVO} | {m: "mlp" for m in ("gate_proj", "up_proj", "down_proj")}


def adapter_tensors(cfg: Any, seed: int, rank: int, targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """PEFT's saved names -> bf16 tensors, from a CPU generator seeded with `seed` (same bytes every time)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_layers):
        for module in targets:
            d_in, d_out = shapes[module]
            pre = f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}"
            # B non-zero (PEFT starts it at zero, which would make the LoRA path free to get wrong).
            out[f"{pre}.lora_A.weight"] = (torch.randn(rank, d_in, generator=gen) * d_in**-0.5).bfloat16()
            out[f"{pre}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) * 0.02).bfloat16()
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
        self._on_disk: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()
        self.writes = 0
        self.write_seconds = 0.0

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

    def _write(self, i: int) -> None:
        import time

        start = time.perf_counter()
        folder = self.folder(i)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = adapter_tensors(self.cfg, self.seed_base + i, self.rank, self.targets)
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
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        with self._lock:
            known = self._hashes.setdefault(i, digest)
            if known != digest:
                raise RuntimeError(f"adapter {i} is not deterministic")
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
        shapes = module_shapes(self.cfg)
        per_layer = sum(self.rank * (shapes[m][0] + shapes[m][1]) for m in self.targets)
        return per_layer * self.cfg.num_layers * 2
