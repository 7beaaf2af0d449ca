"""Recovery emails: address checks, the address's lookup hash, and the associated data that
binds an encrypted key copy to its row (the ring itself is `apifast.crypto.KeyRing`)."""

from __future__ import annotations

import hashlib
import hmac
import re

__all__ = ["email_hash", "key_aad", "normalize_email"]

MAX_EMAIL_LENGTH = 254
# Deliberately loose: one @, no spaces, a dot in the domain. Delivery is the real test.
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s.]+$")


def normalize_email(value: object) -> str | None:
    """The canonical form of an address, or None when it is not one."""
    if not isinstance(value, str):
        return None
    email = value.strip().lower()
    if len(email) > MAX_EMAIL_LENGTH or not _EMAIL.match(email):
        return None
    return email


def email_hash(secret: bytes, email: str) -> bytes:
    """HMAC of a normalized address: how rows are found without storing the address."""
    return hmac.new(secret, b"email:" + email.encode(), hashlib.sha256).digest()


def key_aad(key_id: int, hashed_email: bytes) -> bytes:
    return b"apifast-email-key:" + str(key_id).encode() + b":" + hashed_email
