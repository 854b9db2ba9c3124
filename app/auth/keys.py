"""Key material: `lpx_` + base62 of 32 random bytes; stored as a public prefix + HMAC-SHA256(secret, key).

The `lpx_` marker makes a leaked key recognisable to secret scanners; the prefix (marker + 8 characters)
finds the row without revealing enough to guess the rest; the HMAC needs the server secret, so a copy
of the table alone cannot be used to check guessed keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_MARKER = "lpx_"
PREFIX_LEN = len(KEY_MARKER) + 8
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_BYTES = 32
# 62**43 > 256**32, so 43 characters always hold 32 random bytes.
_BODY_LEN = 43


def _base62(data: bytes, width: int) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out)).rjust(width, "0")


def generate_key() -> str:
    return KEY_MARKER + _base62(secrets.token_bytes(_RANDOM_BYTES), _BODY_LEN)


def looks_like_key(value: str) -> bool:
    body = value[len(KEY_MARKER) :]
    return value.startswith(KEY_MARKER) and len(body) == _BODY_LEN and all(c in _ALPHABET for c in body)


def key_prefix(key: str) -> str:
    return key[:PREFIX_LEN]


def hash_key(secret: str, key: str) -> str:
    return hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
