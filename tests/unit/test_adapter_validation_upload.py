"""The streaming multipart receiver: any chunking gives the same files and hashes; limits bite early."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest

from app.domain.adapters.upload import receive_form
from app.validation import AdapterRejected

BOUNDARY = "----loraplexTestBoundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def body(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


async def chunks(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start : start + size]


CONFIG = b'{"peft_type": "LORA", "r": 8}'
# Larger than the receiver's 1 MiB flush size, and full of bytes that look like boundaries.
WEIGHTS = os.urandom(1_500_000) + f"\r\n--{BOUNDARY[:-1]}".encode() + os.urandom(1000)


@pytest.mark.parametrize("chunk_size", [1_000_000, 65_536, 4_099, 7])
async def test_any_chunking_gives_the_same_files_and_hashes(tmp_path, chunk_size):
    if chunk_size == 7:
        weights = WEIGHTS[:20_000]  # one byte at a time would be slow; the boundary logic is the same
    else:
        weights = WEIGHTS
    data = body(
        [("name", None, b"bot"), ("adapter_config", "c.json", CONFIG), ("weights", "w.safetensors", weights)]
    )
    form = await receive_form(chunks(data, chunk_size), CONTENT_TYPE, len(data), tmp_path, 10_000_000)
    assert form.name == "bot"
    assert form.weights.path.read_bytes() == weights and form.weights.size == len(weights)
    assert form.weights.sha256 == hashlib.sha256(weights).hexdigest()
    assert form.weights.md5_base64 == base64.b64encode(hashlib.md5(weights).digest()).decode()
    assert form.adapter_config.path.read_bytes() == CONFIG
    assert form.adapter_config.sha256 == hashlib.sha256(CONFIG).hexdigest()
    # The client's file names never become paths.
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


async def test_client_file_names_cannot_choose_the_path(tmp_path):
    data = body(
        [("name", None, b"x"), ("adapter_config", "../../etc/passwd", CONFIG), ("weights", "/tmp/evil", b"w")]
    )
    folder = tmp_path / "in"
    folder.mkdir()
    form = await receive_form(chunks(data, 100), CONTENT_TYPE, None, folder, 1000)
    assert form.adapter_config.path.parent == folder and form.weights.path.parent == folder
    assert [p.name for p in tmp_path.iterdir()] == ["in"]
    assert form.adapter_config.filename == "../../etc/passwd"  # kept only as text, for messages


async def test_oversized_weights_stop_the_stream_early(tmp_path):
    received = 0
    data = body([("name", None, b"x"), ("adapter_config", "c.json", CONFIG), ("weights", "w", WEIGHTS)])

    async def counting():
        nonlocal received
        async for piece in chunks(data, 10_000):
            received += len(piece)
            yield piece

    with pytest.raises(AdapterRejected) as info:
        await receive_form(counting(), CONTENT_TYPE, None, tmp_path, 100_000)
    assert info.value.status_code == 413 and info.value.code == "upload_too_large"
    assert received < 200_000  # refused while streaming, not after reading everything


async def test_announced_length_over_the_limit_is_refused_before_reading(tmp_path):
    async def never():
        raise AssertionError("the body must not be read")
        yield b""  # pragma: no cover

    with pytest.raises(AdapterRejected) as info:
        await receive_form(never(), CONTENT_TYPE, 50_000_000, tmp_path, 1_000_000)
    assert info.value.status_code == 413


async def test_a_pickle_name_is_refused_before_its_bytes_arrive(tmp_path):
    data = body([("weights", "adapter_model.bin", b"\x80\x04" + b"x" * 1000)])
    with pytest.raises(AdapterRejected) as info:
        await receive_form(chunks(data, 64), CONTENT_TYPE, None, tmp_path, 1_000_000)
    assert info.value.code == "pickle_refused"
    assert not any(tmp_path.iterdir())


async def test_a_large_upload_is_never_held_in_memory(tmp_path):
    import tracemalloc

    size, block = 32 * 1024 * 1024, os.urandom(256 * 1024)
    digest = hashlib.sha256()

    async def stream():
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'.encode()
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="adapter_config"; filename="c.json"\r\n\r\n'.encode()
        yield CONFIG + b"\r\n"
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'.encode()
        for _ in range(size // len(block)):
            digest.update(block)
            yield block
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    tracemalloc.start()
    try:
        form = await receive_form(stream(), CONTENT_TYPE, None, tmp_path, 64 * 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert form.weights.size == size and form.weights.sha256 == digest.hexdigest()
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes for a {size}-byte upload"


async def test_a_bad_name_is_refused_before_the_files_arrive(tmp_path):
    data = body([("name", None, b"Not/A/Name"), ("weights", "w", WEIGHTS)])
    read = 0

    async def counting():
        nonlocal read
        async for piece in chunks(data, 4096):
            read += len(piece)
            yield piece

    with pytest.raises(AdapterRejected) as info:
        await receive_form(counting(), CONTENT_TYPE, None, tmp_path, 10_000_000)
    assert (info.value.code, info.value.status_code) == ("invalid_name", 422)
    assert read < 100_000
