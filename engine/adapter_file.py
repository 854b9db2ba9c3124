"""The bytes of adapter_model.safetensors: one bounded read, hashed as it lands, parsed into views.

A loader thread reads the file once into its own reused buffer, in chunks handed to a sha256 thread as
they arrive (hashlib lets go of the GIL), while the header is parsed by a strict parser of our own into
tensors that are views of the same bytes: no copy, no code run, and nothing accepted that the safetensors
library would refuse (the parser, engine/safetensors_header.py, is the upload path's too). What is hashed
is exactly what is parsed: nothing writes the buffer after its chunk was read.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from pathlib import Path

import torch
from torch import Tensor

from engine.adapter_format import WEIGHTS_FILE, AdapterError
from engine.safetensors_header import layout_of

# safetensors dtype names of the float types we serve (the header parser refuses every other one).
_ST_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Read size per step: the hash thread starts on the first chunk while the rest is still being read.
_READ_CHUNK = 4 << 20


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
    raw little-endian arrays). The layout is checked by the strict parser the upload path uses too
    (engine/safetensors_header.py): exact entries, float dtypes, byte ranges that tile the data section."""
    try:
        layout = layout_of(data)
    except AdapterError as exc:
        raise AdapterError(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}", exc.code) from None
    return {
        name: _view(data, e.start, math.prod(e.shape), _ST_FLOATS[e.dtype]).view(e.shape)
        for name, e in layout.tensors.items()
    }


def _view(data: memoryview | bytearray, offset: int, numel: int, dtype: torch.dtype) -> Tensor:
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    if offset % dtype.itemsize:  # legal in the format, but torch wants aligned elements: copy this one
        raw = torch.frombuffer(data, dtype=torch.uint8, count=numel * dtype.itemsize, offset=offset)
        return raw.clone().view(dtype)
    return torch.frombuffer(data, dtype=dtype, count=numel, offset=offset)
