"""The safetensors reader of uploads: the engine's own strict parser (engine/safetensors_header.py, torch-free),
so an upload is checked by exactly the code that will load it; its refusals become AdapterRejected."""

from __future__ import annotations

from typing import BinaryIO

from engine.adapter_format import AdapterError
from engine.safetensors_header import MAX_HEADER_BYTES, SafetensorsLayout, TensorEntry
from engine.safetensors_header import read_layout as _read_layout

from .errors import rejected

# The engine loads any header up to this size, so an upload never passes here and fails there.
DEFAULT_MAX_HEADER_BYTES = MAX_HEADER_BYTES


def read_layout(
    f: BinaryIO, file_size: int, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> SafetensorsLayout:
    """Parse and check the header of the safetensors file open as `f` (binary, seekable)."""
    try:
        return _read_layout(f, file_size, max_header_bytes)
    except AdapterError as exc:
        raise rejected(exc) from None


__all__ = ["DEFAULT_MAX_HEADER_BYTES", "SafetensorsLayout", "TensorEntry", "read_layout"]
