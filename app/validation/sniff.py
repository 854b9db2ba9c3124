"""Recognise pickles and archives by their bytes and their names, before any parser sees them.

Nothing here unpickles or unpacks anything: it only names the reason a file is refused, so the
admin sees "pickle" rather than a confusing header error. Detection is advisory; the safetensors
parser refuses anything else that is not exactly a safetensors file anyway.
"""

from __future__ import annotations

from .errors import AdapterRejected

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".lz4")

# (magic, offset, code, what): formats that must never reach a loader.
_MAGIC: tuple[tuple[bytes, int, str, str], ...] = (
    (b"PK\x03\x04", 0, "archive_refused", "a zip archive (torch.save hides a pickle in one)"),
    (b"PK\x05\x06", 0, "archive_refused", "a zip archive"),
    (b"PK\x07\x08", 0, "archive_refused", "a zip archive"),
    (b"\x1f\x8b", 0, "archive_refused", "a gzip archive"),
    (b"BZh", 0, "archive_refused", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", 0, "archive_refused", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", 0, "archive_refused", "a 7z archive"),
    (b"\x28\xb5\x2f\xfd", 0, "archive_refused", "a zstd archive"),
    (b"Rar!\x1a\x07", 0, "archive_refused", "a rar archive"),
    (b"\x04\x22\x4d\x18", 0, "archive_refused", "an lz4 archive"),
    (b"ustar", 257, "archive_refused", "a tar archive"),
    (b"\x93NUMPY", 0, "pickle_refused", "a numpy array file (it may hold pickled objects)"),
)

# Bytes to read from the start of a file for `sniff`.
SNIFF_BYTES = 512


def refuse_by_name(filename: str | None, param: str) -> None:
    """Refuse uploads whose file name says pickle or archive, whatever their bytes."""
    if not filename:
        return
    lower = filename.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise AdapterRejected(
            "pickle_refused",
            f"{param}: '{filename}' is a pickle-based format; only adapter_model.safetensors is accepted "
            "(save with safe_serialization=True)",
            param=param,
            status_code=415,
        )
    if lower.endswith(ARCHIVE_SUFFIXES):
        raise AdapterRejected(
            "archive_refused",
            f"{param}: '{filename}' is an archive; upload adapter_config.json and "
            "adapter_model.safetensors as two plain files",
            param=param,
            status_code=415,
        )


def _looks_like_safetensors_start(head: bytes) -> bool:
    # A real safetensors file: 8-byte little-endian header length, then a JSON object.
    return len(head) > 8 and head[8:9] == b"{"


def _looks_like_pickle(head: bytes) -> bool:
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    # Protocol 0/1 pickles usually open with MARK, GLOBAL or an empty container; a text config
    # never starts with these bytes followed by a newline-terminated module name.
    if head[:1] == b"c" and b"\n" in head[:80] and head[1:2].isalpha():
        first_line = head[1 : head.index(b"\n")]
        return first_line.replace(b".", b"").replace(b"_", b"").isalnum()
    return head[:2] in (b"(d", b"(l", b"(t", b"}q", b"]q", b"(c", b"(i")


def sniff(head: bytes, param: str) -> None:
    """Refuse `head` (the first bytes of an upload) when it is a pickle or an archive."""
    for magic, offset, code, what in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            raise AdapterRejected(code, f"{param}: the file is {what}; refused", param=param, status_code=415)
    if _looks_like_pickle(head) and not _looks_like_safetensors_start(head):
        raise AdapterRejected(
            "pickle_refused",
            f"{param}: the file is a Python pickle; pickles are never loaded (they can run code)",
            param=param,
            status_code=415,
        )
