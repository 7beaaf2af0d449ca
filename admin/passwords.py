"""Admin password hashing with scrypt (hashlib), in a self-describing string:
`scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>`, so the cost can be raised later."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

# 2**15 x 8 x 1: 32 MiB and some 50-100 ms per check, the usual interactive-login setting.
LOG2_N, R, P = 15, 8, 1
_DKLEN = 32
MIN_LENGTH = 12
MAX_LENGTH = 1024


class PasswordError(ValueError):
    pass


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=_DKLEN, maxmem=256 * n * r + (1 << 20)
    )


def check_strength(password: str) -> None:
    if len(password) < MIN_LENGTH:
        raise PasswordError(f"the password must have at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise PasswordError(f"the password must have at most {MAX_LENGTH} characters")


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password, salt, LOG2_N, R, P)
    b64 = base64.b64encode
    return f"scrypt${LOG2_N}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check. With no stored hash it still does the work, then fails, so the
    answer takes as long either way."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        scheme, log2_n, r, p, salt, digest = (stored or "").split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(log2_n), int(r), int(p))
    except ValueError:
        _scrypt(password, b"\0" * 16, LOG2_N, R, P)
        return False
    return hmac.compare_digest(actual, expected)
