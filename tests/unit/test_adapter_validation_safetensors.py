"""The torch-free safetensors reader and the pickle/archive sniffer, against hand-made hostile files."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as safetensors_load

from app.validation.errors import AdapterRejected
from app.validation.safetensors_header import read_layout
from app.validation.sniff import refuse_by_name, sniff


def build(
    tensors: dict[str, tuple[str, list[int], bytes]], *, header: dict | None = None, tail: bytes = b""
) -> bytes:
    """A safetensors file laid out contiguously from `tensors`, or with a hand-written `header`."""
    if header is None:
        header, offset = {}, 0
        for name, (dtype, shape, data) in tensors.items():
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
            offset += len(data)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(d for _, _, d in tensors.values()) + tail


def parse(blob: bytes, max_header_bytes: int = 1 << 20):
    return read_layout(io.BytesIO(blob), len(blob), max_header_bytes)


def rejected(blob: bytes, **kwargs) -> AdapterRejected:
    with pytest.raises(AdapterRejected) as info:
        parse(blob, **kwargs)
    assert info.value.param == "weights"
    assert 400 <= info.value.status_code < 500
    return info.value


F32_2x2 = np.arange(4, dtype="<f4").tobytes()
F16_3 = np.ones(3, dtype="<f2").tobytes()


def test_valid_file_is_read_with_absolute_offsets():
    blob = build({"a": ("F32", [2, 2], F32_2x2), "b": ("F16", [3], F16_3)})
    layout = parse(blob)
    assert set(layout.tensors) == {"a", "b"}
    a, b = layout.tensors["a"], layout.tensors["b"]
    assert (a.shape, a.dtype, b.shape, b.dtype) == ((2, 2), "F32", (3,), "F16")
    assert a.start == 8 + layout.header_bytes and a.end == a.start + 16 == b.start
    assert b.end == len(blob)


def test_metadata_is_kept_and_must_be_strings():
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    }
    assert parse(build({"a": ("F32", [2, 2], F32_2x2)}, header=header)).metadata == {"format": "pt"}
    header["__metadata__"] = {"format": 1}
    assert rejected(build({"a": ("F32", [2, 2], F32_2x2)}, header=header)).code == "malformed_safetensors"


def test_header_length_over_the_cap_is_refused_before_reading_it():
    blob = struct.pack("<Q", 5_000_000) + b"{" + b" " * 100
    err = rejected(blob, max_header_bytes=1_000_000)
    assert err.code == "header_too_large"


def test_header_length_past_the_end_of_the_file():
    blob = struct.pack("<Q", 900) + b'{"a": 1}'
    assert rejected(blob).code == "header_past_end"


@pytest.mark.parametrize("blob", [b"", b"\x01\x02", b"1234567"])
def test_files_shorter_than_the_length_prefix(blob):
    assert rejected(blob).code == "truncated_file"


def test_truncated_data_section():
    blob = build({"a": ("F32", [2, 2], F32_2x2), "b": ("F16", [3], F16_3)})
    err = rejected(blob[:-2])
    assert err.code == "truncated_file"


def test_bytes_after_the_last_tensor():
    blob = build({"a": ("F32", [2, 2], F32_2x2)}, tail=b"\x00" * 4)
    assert rejected(blob).code == "trailing_bytes"


def test_overlapping_offsets():
    header = {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    err = rejected(build({"a": ("F32", [2, 2], F32_2x2)}, header=header))
    assert err.code == "bad_offsets" and "overlaps" in err.message


def test_gap_between_tensors():
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]},
    }
    err = rejected(build({"a": ("F32", [2, 2], F32_2x2)}, header=header))
    assert err.code == "bad_offsets" and "gap" in err.message


def test_offsets_that_disagree_with_the_shape():
    header = {"a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}
    assert rejected(build({"a": ("F32", [2, 2], F32_2x2)}, header=header)).code == "bad_offsets"


def test_offsets_out_of_order_or_negative():
    for offsets in ([16, 0], [-16, 0]):
        header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": offsets}}
        assert rejected(build({"a": ("F32", [2, 2], F32_2x2)}, header=header)).code == "bad_offsets"


def test_offset_far_past_the_file():
    header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [2**40, 2**40 + 16]}}
    assert rejected(build({"a": ("F32", [2, 2], F32_2x2)}, header=header)).code == "bad_offsets"


@pytest.mark.parametrize("dtype", ["I8", "F64", "U8", "F8_E4M3"])
def test_known_but_unaccepted_dtypes_are_refused_by_name(dtype):
    header = {"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 1]}}
    err = rejected(build({"a": ("F32", [1], b"\x00" * 1)}, header=header))
    assert err.code == "dtype_refused" and dtype in err.message


@pytest.mark.parametrize(
    "spec",
    [
        {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]},
        [1, 2, 3],
    ],
)
def test_malformed_tensor_entries(spec):
    blob = build({"a": ("F32", [1], b"\x00" * 4)}, header={"a": spec})
    assert rejected(blob).code == "malformed_safetensors"


def test_duplicate_names_in_the_header_are_refused():
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = f'{{"a": {entry}, "a": {entry}}}'.encode()
    blob = struct.pack("<Q", len(raw)) + raw + b"\x00" * 4
    err = rejected(blob)
    assert err.code == "malformed_safetensors" and "twice" in err.message


@pytest.mark.parametrize(
    "raw", [b"not json at all", b'{"a": NaN}', b"[1, 2]", b"{\xff\xfe}", b'{"a":' + b"[" * 200_000]
)
def test_header_that_is_not_a_json_object(raw):
    blob = struct.pack("<Q", len(raw)) + raw
    assert rejected(blob).code == "malformed_safetensors"


def test_a_header_with_no_tensors():
    raw = b'{"__metadata__": {"format": "pt"}}'
    assert rejected(struct.pack("<Q", len(raw)) + raw).code == "missing_tensor"


# --- pickles and archives ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_bytes_are_named_as_pickle(protocol):
    blob = pickle.dumps({"base_model.model.x": [1.0, 2.0]}, protocol=protocol)
    with pytest.raises(AdapterRejected) as info:
        sniff(blob[:512], "weights")
    assert info.value.code == "pickle_refused" and info.value.status_code == 415


def test_protocol_zero_pickle_is_named_as_pickle():
    with pytest.raises(AdapterRejected) as info:
        sniff(pickle.dumps({"a": 1}, protocol=0)[:512], "adapter_config")
    assert info.value.code == "pickle_refused" and info.value.param == "adapter_config"


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps([1, 2]))
    return buf.getvalue()


def _tar_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    return buf.getvalue()


@pytest.mark.parametrize("make", [_zip_bytes, _tar_bytes, lambda: b"\x1f\x8b\x08\x00" + b"\x00" * 20])
def test_archives_are_refused(make):
    with pytest.raises(AdapterRejected) as info:
        sniff(make()[:512], "weights")
    assert info.value.code == "archive_refused"


def test_torch_save_output_is_refused(tmp_path: Path):
    import torch

    path = tmp_path / "adapter_model.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(AdapterRejected) as info:
        sniff(path.read_bytes()[:512], "weights")
    assert info.value.code == "archive_refused" and "torch.save" in info.value.message


def test_a_real_safetensors_file_whose_length_looks_like_a_pickle_opcode_is_not_misnamed():
    # A header of 0x0280 bytes starts the file with 0x80 0x02, the pickle protocol-2 prefix.
    name = "t"
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    raw = json.dumps({name: entry}).encode()
    raw += b" " * (0x0280 - len(raw))
    blob = struct.pack("<Q", len(raw)) + raw + b"\x00" * 4
    assert blob[:2] == b"\x80\x02"
    sniff(blob[:512], "weights")
    assert set(parse(blob).tensors) == {name}


@pytest.mark.parametrize(
    ("filename", "code"),
    [
        ("adapter_model.bin", "pickle_refused"),
        ("ADAPTER.PT", "pickle_refused"),
        ("x.pth", "pickle_refused"),
        ("x.ckpt", "pickle_refused"),
        ("adapter.zip", "archive_refused"),
        ("adapter.tar.gz", "archive_refused"),
    ],
)
def test_pickle_and_archive_file_names_are_refused(filename, code):
    with pytest.raises(AdapterRejected) as info:
        refuse_by_name(filename, "weights")
    assert info.value.code == code and filename in info.value.message


def test_ordinary_names_pass():
    refuse_by_name("adapter_model.safetensors", "weights")
    refuse_by_name("adapter_config.json", "adapter_config")
    refuse_by_name(None, "weights")


def test_random_corruption_is_always_a_clean_refusal():
    """Flip bytes and cut files at random: the reader either accepts or raises AdapterRejected, never
    anything else (no IndexError, no MemoryError, no hang)."""
    import random

    rng = random.Random(1234)
    original = build({f"t{i}": ("F16", [3, 5], np.ones(15, dtype="<f2").tobytes()) for i in range(6)})
    outcomes = {"accepted": 0, "refused": 0}
    for _ in range(400):
        blob = bytearray(original)
        for _ in range(rng.randint(1, 6)):
            position = rng.randrange(len(blob)) if rng.random() < 0.5 else rng.randrange(min(len(blob), 300))
            blob[position] = rng.randrange(256)
        if rng.random() < 0.2:
            blob = blob[: rng.randrange(len(blob))]
        try:
            layout = parse(bytes(blob))
            outcomes["accepted"] += 1
            # Whatever we accept, the real safetensors reader (the engine's) reads the same way.
            loaded = safetensors_load(bytes(blob))
            assert {k: tuple(v.shape) for k, v in loaded.items()} == {
                name: entry.shape for name, entry in layout.tensors.items()
            }
        except AdapterRejected as exc:
            assert exc.code and exc.status_code in (413, 415, 422)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100  # the corruption really hit the header


def test_the_value_scan_reads_in_bounded_chunks(tmp_path: Path):
    import tracemalloc

    from app.validation.lora_weights import scan_finite

    rows, cols = 4096, 4096  # 64 MiB of F32
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}}
    ).encode()
    path = tmp_path / "big.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        zeros = bytes(1024 * 1024)
        for _ in range(rows * cols * 4 // len(zeros)):
            f.write(zeros)
        f.seek(-4, 2)
        f.write(np.array([np.inf], dtype="<f4").tobytes())  # the very last value
    size = path.stat().st_size
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            layout = read_layout(f, size)
            with pytest.raises(AdapterRejected) as info:
                scan_finite(f, layout)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == "non_finite_values"
    assert peak < 24 * 1024 * 1024, f"peak {peak} bytes scanning a {size}-byte file"
