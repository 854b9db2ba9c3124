"""The bytes of adapter_model.safetensors: one bounded read, hashed as it lands, parsed into views.

A loader thread reads the file once into its own reused buffer, in chunks handed to a sha256 thread as
they arrive (hashlib lets go of the GIL), while the header is parsed by a strict parser of our own into
tensors that are views of the same bytes: no copy, no code run, and nothing accepted that the safetensors
library would refuse (tests/engine/test_lora_loading.py fuzzes both). What is hashed is exactly what is
parsed: nothing writes the buffer after its chunk was read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

WEIGHTS_FILE = "adapter_model.safetensors"
# safetensors dtype names: the float ones we serve, and the others, which are refused by name.
_ST_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_OTHERS = {"F64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}
# Read size per step: the hash thread starts on the first chunk while the rest is still being read.
_READ_CHUNK = 4 << 20


class AdapterError(ValueError):
    """An adapter that cannot be served on this base model; the message says why."""


class ReadBuffer:
    """One loader thread's reusable read buffer. A fresh 27 MB buffer per load costs its page faults on
    every load (5-15 ms measured); a loader thread reads one adapter at a time, so one buffer serves it.
    What a load returns never points into it (the stacked adapter is a copy)."""

    def __init__(self) -> None:
        self._data = bytearray()

    def get(self, size: int) -> memoryview:
        if len(self._data) < size:
            self._data = bytearray(size)
        return memoryview(self._data)[:size]


class Sha256Thread(threading.Thread):
    """sha256 of the chunks fed to it, computed on its own thread; `feed(None)` ends the input."""

    def __init__(self) -> None:
        super().__init__(name="lora-sha256", daemon=True)
        self._chunks: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._hex = ""
        self.start()

    def feed(self, chunk: memoryview | None) -> None:
        self._chunks.put(chunk)

    def run(self) -> None:
        h = hashlib.sha256()
        while (chunk := self._chunks.get()) is not None:
            h.update(chunk)
        self._hex = h.hexdigest()

    def hexdigest(self) -> str:
        self.join()
        return self._hex


def read_bounded(
    weights_file: Path, limit: int, max_rank: int, buffer: ReadBuffer, digest: Sha256Thread
) -> memoryview:
    """The whole file, read once into `buffer` in chunks, each fed to `digest` as it lands (and the end
    of input fed, whatever happens). Refused when larger than `limit` or when it grows while read (a file
    that lies about its size cannot exhaust memory)."""
    try:
        with weights_file.open("rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise AdapterError(
                    f"{WEIGHTS_FILE} is larger than any adapter of rank <= {max_rank} for this model"
                )
            data = buffer.get(size + 1)  # one spare byte tells a file that grew from one that did not
            filled = 0
            while filled < len(data) and (got := f.readinto(data[filled : filled + _READ_CHUNK])):
                digest.feed(data[filled : filled + got])
                filled += got
    finally:
        digest.feed(None)
    if filled > size:
        raise AdapterError(f"{WEIGHTS_FILE} changed while it was read")
    return data[:filled]


def parse_safetensors(data: memoryview | bytearray) -> dict[str, Tensor]:
    """safetensors bytes -> tensors that are views of `data` (no copy, no code run: a JSON header and
    raw little-endian arrays). It accepts no file that safetensors' own parser refuses (a test checks
    this on mutated files), and refuses duplicate names, which that one takes: the header must be an
    object of {dtype, shape, data_offsets} entries whose byte ranges tile the data section exactly (no
    gaps, no overlaps, nothing after), each range the size its dtype and shape say."""

    def refuse(why: str) -> AdapterError:
        return AdapterError(f"{WEIGHTS_FILE} is not a readable safetensors file: {why}")

    if len(data) < 8:
        raise refuse("shorter than its 8-byte header length")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise refuse("header length runs past the end of the file")
    try:
        header = json.loads(str(data[8 : 8 + header_len], "utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise refuse(f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise refuse("header is not a JSON object")
    entries: list[tuple[int, int, str, str, list[int]]] = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise refuse("__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise refuse(f"entry {key!r} must hold dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise refuse(f"entry {key!r} has a bad shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise refuse(f"entry {key!r} has bad data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_FLOATS:
            if isinstance(dtype, str) and dtype in _ST_OTHERS:
                raise AdapterError(f"tensor {key!r} has dtype {dtype}; expected a float type (F32/F16/BF16)")
            raise refuse(f"entry {key!r} has unknown dtype {dtype!r}")
        entries.append((offsets[0], offsets[1], key, dtype, shape))
    entries.sort()
    end = 0
    for begin, stop, key, dtype, shape in entries:
        if begin != end or stop - begin != math.prod(shape) * _ST_FLOATS[dtype].itemsize:
            raise refuse(f"entry {key!r}: its bytes do not follow the previous tensor's or fit its shape")
        end = stop
    data_start = 8 + header_len
    if data_start + end != len(data):
        raise refuse("data section does not match the tensors it holds")
    return {
        key: _view(data, data_start + begin, math.prod(shape), _ST_FLOATS[dtype]).view(shape)
        for begin, _, key, dtype, shape in entries
    }


def _view(data: memoryview | bytearray, offset: int, numel: int, dtype: torch.dtype) -> Tensor:
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    if offset % dtype.itemsize:  # legal in the format, but torch wants aligned elements: copy this one
        raw = torch.frombuffer(data, dtype=torch.uint8, count=numel * dtype.itemsize, offset=offset)
        return raw.clone().view(dtype)
    return torch.frombuffer(data, dtype=dtype, count=numel, offset=offset)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out
