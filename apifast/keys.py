"""API keys: `af-` + base62(32 random bytes) + a 4-character checksum, stored only as an HMAC.

The checksum lets a typo be rejected before any database lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib

PREFIX = "af-"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_LEN = 43  # ceil(256 / log2(62))
_CHECK_LEN = 4
# One C-level match instead of a per-character loop: this runs on every request.
_SHAPE = re.compile(rf"{PREFIX}[0-9A-Za-z]{{{_BODY_LEN + _CHECK_LEN}}}")


def _base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, rem = divmod(number, 62)
        digits.append(_ALPHABET[rem])
    return "".join(reversed(digits)).rjust(width, "0")


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_LEN + 2)[-_CHECK_LEN:]


def generate_key() -> str:
    body = _base62(int.from_bytes(secrets.token_bytes(32), "big"), _BODY_LEN)
    return f"{PREFIX}{body}{_checksum(body)}"


def is_well_formed(key: str) -> bool:
    """Shape and checksum only; says nothing about whether the key exists."""
    if _SHAPE.fullmatch(key) is None:
        return False
    body = key[len(PREFIX) : len(PREFIX) + _BODY_LEN]
    return hmac.compare_digest(key[-_CHECK_LEN:], _checksum(body))


def hash_key(secret: bytes, key: str) -> bytes:
    """HMAC-SHA256(server secret, key): the only form in which a key is stored."""
    return hmac.new(secret, key.encode(), hashlib.sha256).digest()


def key_prefix(key: str) -> str:
    """The first characters, shown to admins so they can find a key without seeing it."""
    return key[: len(PREFIX) + 8]
