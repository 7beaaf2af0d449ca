"""The AES-GCM key ring for what ApiFast stores encrypted: the key copies kept with recovery
emails and the upstream API keys managed in the admin panel.

The ring is `kid:base64key,...` (APIFAST_ENCRYPTION_KEYS): the first key encrypts, every key
decrypts, so a new key can be put first and old rows still open. Callers bind each
ciphertext to its row with associated data, so rows cannot be swapped.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["DERIVED_KID", "EncryptedKey", "KeyRing", "KeyRingError"]

DERIVED_KID = "derived"


class KeyRingError(ValueError):
    """A malformed APIFAST_ENCRYPTION_KEYS, or a ciphertext that does not open."""


@dataclass(frozen=True, slots=True)
class EncryptedKey:
    kid: str
    nonce: bytes
    ciphertext: bytes


class KeyRing:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise KeyRingError("the key ring is empty")
        self._keys = {kid: AESGCM(key) for kid, key in keys}
        if len(self._keys) != len(keys):
            raise KeyRingError("APIFAST_ENCRYPTION_KEYS repeats a key id")
        self.current = keys[0][0]

    @classmethod
    def parse(cls, spec: str) -> KeyRing:
        """`kid:base64key,...` with 16-, 24- or 32-byte keys (AES-128/192/256)."""
        keys = []
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            kid, sep, encoded = item.partition(":")
            if not sep or not kid.strip():
                raise KeyRingError("APIFAST_ENCRYPTION_KEYS entries look like kid:base64key")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except binascii.Error:
                raise KeyRingError(f"key {kid.strip()!r} is not valid base64") from None
            if len(key) not in (16, 24, 32):
                raise KeyRingError(f"key {kid.strip()!r} must be 16, 24 or 32 bytes")
            keys.append((kid.strip(), key))
        return cls(keys)

    @classmethod
    def from_settings(cls, encryption_keys: str, secret: bytes) -> KeyRing:
        """The configured ring, or one key derived from the server secret when none is set."""
        if encryption_keys.strip():
            return cls.parse(encryption_keys)
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"apifast email-key encryption"
        ).derive(secret)
        return cls([(DERIVED_KID, derived)])

    def encrypt(self, plaintext: bytes, aad: bytes) -> EncryptedKey:
        nonce = os.urandom(12)
        return EncryptedKey(
            self.current, nonce, self._keys[self.current].encrypt(nonce, plaintext, aad)
        )

    def decrypt(self, sealed: EncryptedKey, aad: bytes) -> bytes:
        key = self._keys.get(sealed.kid)
        if key is None:
            raise KeyRingError(f"no key {sealed.kid!r} in the ring")
        try:
            return key.decrypt(sealed.nonce, sealed.ciphertext, aad)
        except Exception as exc:  # cryptography raises InvalidTag
            raise KeyRingError("ciphertext does not open") from exc
