"""Key material: recognisable, random, hashed with the server secret, compared in constant time."""

from __future__ import annotations

from app.auth.keys import PREFIX_LEN, generate_key, hash_key, key_prefix, looks_like_key, same_hash
from app.auth.principal import Principal


def test_keys_are_lpx_plus_base62_of_32_bytes():
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("lpx_")
        body = key[4:]
        assert len(body) == 43  # 62**43 > 2**256
        assert body.isalnum() and body.isascii()
        assert looks_like_key(key)
    # Prefixes are spread out, so a lookup by prefix finds one row.
    assert len({key_prefix(k) for k in keys}) == 200
    assert all(len(key_prefix(k)) == PREFIX_LEN for k in keys)


def test_looks_like_key_rejects_near_misses():
    key = generate_key()
    for bad in [key[:-1], key + "a", "LPX_" + key[4:], "lpx-" + key[4:], key[:-1] + "!", "", "lpx_"]:
        assert not looks_like_key(bad), bad


def test_hash_needs_the_secret():
    key = generate_key()
    a = hash_key("secret-one-0123456789", key)
    assert len(a) == 64
    assert a == hash_key("secret-one-0123456789", key)
    assert a != hash_key("secret-two-0123456789", key)
    assert key not in a
    assert same_hash(a, a) and not same_hash(a, hash_key("secret-one-0123456789", generate_key()))


def test_admin_principals_hold_no_tenant_scopes():
    admin = Principal(kind="admin", tenant_id=None, key_id=None, scopes=frozenset())
    assert admin.is_admin and not admin.has_scope("completions") and not admin.has_scope("billing")
    tenant = Principal(kind="tenant", tenant_id=None, key_id=None, scopes=frozenset({"billing"}))
    assert tenant.has_scope("billing") and not tenant.has_scope("completions") and not tenant.is_admin
