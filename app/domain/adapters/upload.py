"""Receiving the multipart upload: streamed to files while hashing, never whole in memory.

Litestar's own form parsing is not used because it has no per-field size limit and no hashing; here
each part goes straight to a file in the upload's private temporary folder, and the limits are checked
as the bytes arrive, so an oversized body is refused after at most one chunk past the limit.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from multipart import (
    MultipartSegment,
    ParserError,
    ParserLimitReached,
    PushMultipartParser,
    parse_options_header,
)

from app.domain.adapters.service import NAME_RULE, is_valid_name
from app.validation import AdapterRejected, refuse_by_name
from app.validation.lora_config import MAX_CONFIG_BYTES
from engine.adapter_format import CONFIG_FILE, WEIGHTS_FILE

MAX_NAME_BYTES = 256
# Room for the multipart framing and the two small fields around the weights.
FORM_OVERHEAD_BYTES = MAX_CONFIG_BYTES + 64 * 1024
_FLUSH_BYTES = 1024 * 1024
_FIELDS = ("name", "adapter_config", "weights")


@dataclass
class ReceivedFile:
    path: Path
    filename: str | None
    size: int = 0
    sha256: str = ""
    md5_base64: str = ""


@dataclass
class ReceivedForm:
    name: str
    adapter_config: ReceivedFile
    weights: ReceivedFile


def _refuse(code: str, message: str, param: str | None = None, status: int = 400) -> AdapterRejected:
    return AdapterRejected(code, message, param=param or "body", status_code=status)


def too_large(max_weights_bytes: int) -> AdapterRejected:
    return _refuse(
        "upload_too_large",
        f"weights: the file exceeds the upload limit of {max_weights_bytes} bytes (LORAPLEX_MAX_UPLOAD_BYTES)",
        "weights",
        413,
    )


def boundary_of(content_type: str | None) -> str:
    kind, options = parse_options_header(content_type or "")
    if kind != "multipart/form-data" or not options.get("boundary"):
        raise _refuse(
            "unsupported_media_type",
            "send multipart/form-data with the fields name, adapter_config and weights",
            status=415,
        )
    return str(options["boundary"])


@dataclass
class _Part:
    """The part being received: its file (or a small buffer for `name`), hashes and size so far."""

    field_name: str
    limit: int
    file: BinaryIO | None = None
    received: ReceivedFile | None = None
    text: bytearray = field(default_factory=bytearray)
    pending: list[bytes] = field(default_factory=list)
    pending_bytes: int = 0
    size: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)
    md5: Any = field(default_factory=hashlib.md5)

    def write_pending(self) -> None:
        # Runs in a worker thread: hashing and writing a megabyte should not stall the event loop.
        data = b"".join(self.pending)
        self.pending, self.pending_bytes = [], 0
        self.sha256.update(data)
        self.md5.update(data)
        assert self.file is not None
        self.file.write(data)


class FormReceiver:
    """Feeds body chunks through the multipart parser into files under `folder`."""

    def __init__(self, folder: Path, max_weights_bytes: int) -> None:
        self.folder = folder
        self.max_weights_bytes = max_weights_bytes
        self.parts: dict[str, ReceivedFile | str] = {}
        self.current: _Part | None = None

    def _start(self, segment: MultipartSegment) -> _Part:
        name = segment.name
        if name not in _FIELDS:
            raise _refuse("unexpected_field", f"unexpected form field '{str(name)[:64]}'", "body")
        if name in self.parts:
            raise _refuse("duplicate_field", f"form field '{name}' was sent twice", name)
        if name == "name":
            return _Part(name, MAX_NAME_BYTES)
        if not segment.filename:
            raise _refuse("file_expected", f"'{name}' must be sent as a file", name)
        refuse_by_name(segment.filename, name)
        limit = MAX_CONFIG_BYTES if name == "adapter_config" else self.max_weights_bytes
        path = self.folder / (CONFIG_FILE if name == "adapter_config" else WEIGHTS_FILE)
        received = ReceivedFile(path=path, filename=segment.filename)
        # Closed in _finish, or by close() when the upload fails midway.
        return _Part(name, limit, file=open(path, "wb"), received=received)

    async def _data(self, part: _Part, chunk: bytes) -> None:
        part.size += len(chunk)
        if part.size > part.limit:
            if part.field_name == "weights":
                raise too_large(self.max_weights_bytes)
            if part.field_name == "adapter_config":
                raise _refuse(
                    "config_too_large",
                    f"adapter_config: larger than {part.limit} bytes",
                    part.field_name,
                    413,
                )
            raise _refuse(
                "field_too_large", f"'{part.field_name}' is larger than {part.limit} bytes", part.field_name
            )
        if part.file is None:
            part.text.extend(chunk)
            return
        part.pending.append(bytes(chunk))
        part.pending_bytes += len(chunk)
        if part.pending_bytes >= _FLUSH_BYTES:
            await asyncio.to_thread(part.write_pending)

    async def _finish(self, part: _Part) -> None:
        if part.file is None:
            try:
                name = part.text.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise _refuse("invalid_name", "the adapter name is not UTF-8 text", "name", 422) from None
            if not is_valid_name(name):
                # Checked as soon as the field arrives, so a bad name never costs a gigabyte of upload.
                raise _refuse("invalid_name", f"name: {NAME_RULE} (and not shaped like a UUID)", "name", 422)
            self.parts[part.field_name] = name
            return
        await asyncio.to_thread(part.write_pending)
        part.file.close()
        assert part.received is not None
        part.received.size = part.size
        part.received.sha256 = part.sha256.hexdigest()
        part.received.md5_base64 = base64.b64encode(part.md5.digest()).decode()
        self.parts[part.field_name] = part.received

    async def feed(self, parser: PushMultipartParser, chunk: bytes) -> None:
        for event in parser.parse(chunk):
            if isinstance(event, MultipartSegment):
                self.current = self._start(event)
            elif event:
                assert self.current is not None
                await self._data(self.current, event)
            elif self.current is not None:
                await self._finish(self.current)
                self.current = None

    def close(self) -> None:
        if self.current is not None and self.current.file is not None:
            self.current.file.close()

    def result(self) -> ReceivedForm:
        missing = [name for name in _FIELDS if name not in self.parts]
        if missing:
            raise _refuse("missing_field", f"missing form field(s): {', '.join(missing)}", missing[0])
        name, config, weights = (self.parts[f] for f in _FIELDS)
        assert (
            isinstance(name, str) and isinstance(config, ReceivedFile) and isinstance(weights, ReceivedFile)
        )
        return ReceivedForm(name=name, adapter_config=config, weights=weights)


async def receive_form(
    stream: AsyncIterator[bytes],
    content_type: str | None,
    content_length: int | None,
    folder: Path,
    max_weights_bytes: int,
) -> ReceivedForm:
    """Stream the multipart body into `folder`; raise AdapterRejected (400/413/415) on bad input."""
    boundary = boundary_of(content_type)
    max_body = max_weights_bytes + FORM_OVERHEAD_BYTES
    if content_length is not None and content_length > max_body:
        raise too_large(max_weights_bytes)
    receiver = FormReceiver(folder, max_weights_bytes)
    total = 0
    try:
        with PushMultipartParser(boundary, max_segment_count=len(_FIELDS) + 1, max_header_count=8) as parser:
            async for chunk in stream:
                if not chunk:
                    continue
                total += len(chunk)
                if total > max_body:
                    raise too_large(max_weights_bytes)
                await receiver.feed(parser, chunk)
            await receiver.feed(parser, b"")
            if not parser.closed:
                raise _refuse("malformed_multipart", "the multipart body ended early")
    except ParserLimitReached:
        raise _refuse("malformed_multipart", "too many form fields or headers") from None
    except ParserError as exc:
        raise _refuse("malformed_multipart", f"the multipart body is malformed: {exc}") from None
    finally:
        receiver.close()
    return receiver.result()
