"""The one strict, torch-free reader of a safetensors layout, used at upload (app/) and at load (engine/).

Format: 8-byte little-endian header length N, N bytes of JSON, then the tensor data. Every tensor's
`data_offsets` are relative to the data section. A file is accepted only when its header is a JSON
object without duplicate names or non-JSON constants, every entry is exactly {dtype, shape, data_offsets}
with a float dtype we serve, and the tensors tile the data section exactly: from 0, contiguous, no
overlap, no gap, ending at the file's last byte. Nothing the safetensors library refuses is accepted
(tests/engine/test_lora_loading.py fuzzes both); the length is capped before the header is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, BinaryIO

from engine.adapter_format import AdapterError

# Every dtype the format defines, so an unknown one is "malformed" and a known-but-unwanted one is
# "refused dtype" (a clearer message for int8 or fp8 adapters).
KNOWN_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1,
    "F6_E3M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
    "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4}

# A full-rank-pattern header of an 80-layer model with every projection targeted is about 150 KB.
MAX_HEADER_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def itemsize(self) -> int:
        return FLOAT_DTYPES[self.dtype]


@dataclass(frozen=True, slots=True)
class SafetensorsLayout:
    header_bytes: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _reject(code: str, message: str) -> AdapterError:
    return AdapterError(message, code, "weights")


def header_length(first8: bytes, file_size: int, max_header_bytes: int = MAX_HEADER_BYTES) -> int:
    """The header's length from the file's first 8 bytes, checked against the cap and the file's size."""
    if file_size < 8 or len(first8) < 8:
        raise _reject(
            "truncated_file", f"the file is {file_size} bytes, shorter than its 8-byte header length"
        )
    length = int.from_bytes(first8[:8], "little")
    if length > max_header_bytes:
        raise _reject(
            "header_too_large", f"the header claims {length} bytes; at most {max_header_bytes} are accepted"
        )
    if 8 + length > file_size:
        raise _reject(
            "header_past_end", f"the header claims {length} bytes, past the end of the file ({file_size - 8})"
        )
    return length


def parse_header(raw: bytes | memoryview, file_size: int) -> SafetensorsLayout:
    """The layout from the header's JSON bytes (the `length` bytes after the first 8) and the file's size."""
    length = len(raw)
    if not bytes(raw[:1]) == b"{":
        raise _reject("malformed_safetensors", "the header is not a JSON object")
    try:
        parsed = json.loads(str(raw, "utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_bad_constant)
    except AdapterError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _reject(
            "malformed_safetensors", f"the header is not valid JSON ({type(exc).__name__})"
        ) from None
    if not isinstance(parsed, dict):
        raise _reject("malformed_safetensors", "the header is not a JSON object")
    data_start = 8 + length
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _reject("malformed_safetensors", "__metadata__ must map strings to strings")
    if not parsed:
        raise _reject("missing_tensor", "the file holds no tensors")
    entries = [_entry(name, spec, data_start) for name, spec in parsed.items()]
    _check_tiling(entries, data_start, file_size)
    return SafetensorsLayout(length, {e.name: e for e in entries}, metadata)


def read_layout(f: BinaryIO, file_size: int, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsLayout:
    """The layout of the safetensors file open as `f` (binary, seekable); reads only the header."""
    f.seek(0)
    length = header_length(f.read(8), file_size, max_header_bytes)
    raw = f.read(length)
    if len(raw) != length:
        raise _reject("truncated_file", "the file ended inside the header")
    return parse_header(raw, file_size)


def layout_of(
    data: bytes | bytearray | memoryview, max_header_bytes: int = MAX_HEADER_BYTES
) -> SafetensorsLayout:
    """The layout of a whole safetensors file held in memory."""
    view = memoryview(data)
    length = header_length(bytes(view[:8]), len(view), max_header_bytes)
    return parse_header(view[8 : 8 + length], len(view))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two entries with one name would let a checker and a loader disagree on which tensor is real.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _reject("malformed_safetensors", f"the header names '{key[:100]}' twice")
        out[key] = value
    return out


def _bad_constant(name: str) -> Any:
    raise _reject("malformed_safetensors", f"the header holds the non-JSON constant {name}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _entry(name: str, spec: Any, data_start: int) -> TensorEntry:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise _reject(
            "malformed_safetensors", f"tensor '{name}' must hold exactly dtype, shape and data_offsets"
        )
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in KNOWN_DTYPES:
        raise _reject("malformed_safetensors", f"tensor '{name}' has an unknown dtype {str(dtype)[:20]!r}")
    if dtype not in FLOAT_DTYPES:
        raise _reject("dtype_refused", f"tensor '{name}' is {dtype}; only F16, BF16 and F32 are accepted")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
        raise _reject("malformed_safetensors", f"tensor '{name}' has an invalid shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise _reject("malformed_safetensors", f"tensor '{name}' has invalid data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _reject("bad_offsets", f"tensor '{name}' has data_offsets [{begin}, {end}] out of order")
    expected = math.prod(shape) * FLOAT_DTYPES[dtype]
    if end - begin != expected:
        raise _reject(
            "bad_offsets",
            f"tensor '{name}' spans {end - begin} bytes but shape {shape} of {dtype} needs {expected}",
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_tiling(entries: list[TensorEntry], data_start: int, file_size: int) -> None:
    position = data_start
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.start < position:
            raise _reject("bad_offsets", f"tensor '{entry.name}' overlaps the tensor before it")
        if entry.start > position:
            raise _reject("bad_offsets", f"there is a gap of unclaimed bytes before tensor '{entry.name}'")
        position = entry.end
    if position > file_size:
        raise _reject(
            "truncated_file",
            f"the header says the file is {position} bytes long but it holds only {file_size}",
        )
    if position < file_size:
        raise _reject(
            "trailing_bytes",
            f"the file has {file_size - position} bytes after the last tensor the header names",
        )
