"""Signed receipts: what a priced request cost, signed with Ed25519 so that an account-less
key holder can prove it, offline, with the public keys at /.well-known/apifast-receipts.json.

A receipt is `base64url(payload) "." base64url(signature)`, the signature over the payload
bytes. The payload is JSON with sorted keys: `v` (1), `kid` (the signing key), `id` (the
generation id), `model` (the public model), `api` (the protocol), `input_tokens`,
`output_tokens`, `cached_tokens`, `cost_usd` (an exact decimal string), `ts` (the request's
start, Unix milliseconds) and `key` (the first 16 hex digits of the key's hash). No content.

Signing uses libsodium (PyNaCl), which signs in half the time OpenSSL takes through
`cryptography` (16 against 31 us, on every priced request); Ed25519 signatures are
deterministic (RFC 8032), so both give the same bytes. Keys and verification stay with
`cryptography`.

Keys: `APIFAST_RECEIPT_KEYS` ("kid:base64url-32-byte-seed,...", the first signs, all are
published), else one generated once under the data dir (`receipts/keys.json`), which is
enough for a single host; several routers must share the setting.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_sign, crypto_sign_seed_keypair

VERSION = 1
KEY_PREFIX_HEX = 16


class ReceiptError(ValueError):
    """Not a receipt, an unknown key, or a signature that does not match."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise ReceiptError("not a receipt: bad base64") from None


def canonical_usd(amount: Decimal) -> str:
    """One spelling per amount, whatever its scale: '0.000123', '0', '1.5'."""
    return format(amount.normalize(), "f") if amount else "0"


def receipt_fields(
    *, generation_id: str, model: str, api: str, input_tokens: int, output_tokens: int,
    cached_tokens: int, cost_usd: Decimal, ts_ms: int, key_hash_hex: str,
) -> dict[str, Any]:  # fmt: skip
    """What a receipt says, from the router's event or from ClickHouse's row alike."""
    return {
        "v": VERSION,
        "id": generation_id,
        "model": model,
        "api": api,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_tokens": cached_tokens,
        "cost_usd": canonical_usd(cost_usd),
        "ts": ts_ms,
        "key": key_hash_hex[:KEY_PREFIX_HEX],
    }


def kid_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes_raw()
    return "r" + hashlib.sha256(raw).hexdigest()[:10]


@dataclass(frozen=True)
class ReceiptSigner:
    kid: str
    secret: bytes = field(repr=False)  # libsodium's 64-byte secret key (seed + public key)
    published: dict[str, Ed25519PublicKey]  # kid -> public key, the signing one first

    @classmethod
    def from_seeds(cls, seeds: list[tuple[str, bytes]]) -> ReceiptSigner:
        published = {
            kid: Ed25519PrivateKey.from_private_bytes(seed).public_key() for kid, seed in seeds
        }
        kid, seed = seeds[0]
        return cls(kid, crypto_sign_seed_keypair(seed)[1], published)

    @classmethod
    def from_settings(cls, receipt_keys: str, data_dir: Path) -> ReceiptSigner:
        if receipt_keys.strip():
            seeds: list[tuple[str, bytes]] = []
            for item in receipt_keys.split(","):
                kid, _, seed = item.strip().partition(":")
                raw = _unb64(seed)
                if not kid or len(raw) != 32:
                    raise ValueError("APIFAST_RECEIPT_KEYS: each entry is kid:base64url(32 bytes)")
                if any(kid == seen for seen, _ in seeds):
                    # One kid, two keys: the later one was published, the first signed, and
                    # no receipt verified.
                    raise ValueError(f"APIFAST_RECEIPT_KEYS: the kid {kid!r} is given twice")
                seeds.append((kid, raw))
            return cls.from_seeds(seeds)
        return cls.from_seeds(_data_dir_seeds(_key_file(data_dir)))

    def sign(self, fields: dict[str, Any]) -> str:
        payload = orjson.dumps({**fields, "kid": self.kid}, option=orjson.OPT_SORT_KEYS)
        # crypto_sign returns the signature followed by the message.
        return f"{_b64(payload)}.{_b64(crypto_sign(payload, self.secret)[:64])}"

    def public_document(self) -> dict[str, Any]:
        """/.well-known/apifast-receipts.json"""
        return {
            "keys": [
                {"kid": kid, "alg": "Ed25519", "public_key": _b64(key.public_bytes_raw())}
                for kid, key in self.published.items()
            ],
            "format": "base64url(payload).base64url(Ed25519 signature of payload)",
        }


def own_public_keys(receipt_keys: str, data_dir: Path) -> dict[str, Ed25519PublicKey] | None:
    """This server's verifying keys, only read: from `APIFAST_RECEIPT_KEYS`, else the data
    dir's key file; None when there is neither (verifying never makes a signing key)."""
    if receipt_keys.strip():
        return ReceiptSigner.from_settings(receipt_keys, data_dir).published
    path = _key_file(data_dir)
    if not path.exists():
        return None
    return ReceiptSigner.from_seeds(_read_seeds(path)).published


def public_keys(document: dict[str, Any]) -> dict[str, Ed25519PublicKey]:
    """The keys of a /.well-known/apifast-receipts.json document."""
    try:
        return {
            k["kid"]: Ed25519PublicKey.from_public_bytes(_unb64(k["public_key"]))
            for k in document["keys"]
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ReceiptError(f"not a receipt keys document ({type(exc).__name__})") from None


def verify(receipt: str, keys: dict[str, Ed25519PublicKey]) -> dict[str, Any]:
    """The receipt's payload, if its signature is good under the key it names."""
    payload_b64, dot, signature_b64 = receipt.strip().partition(".")
    if not dot:
        raise ReceiptError("not a receipt: expected payload.signature")
    payload = _unb64(payload_b64)
    try:
        fields = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ReceiptError("not a receipt: the payload is not JSON") from None
    if not isinstance(fields, dict) or fields.get("v") != VERSION:
        raise ReceiptError("not a receipt: unknown version")
    key = keys.get(str(fields.get("kid")))
    if key is None:
        raise ReceiptError(f"unknown signing key {fields.get('kid')!r}")
    try:
        key.verify(_unb64(signature_b64), payload)
    except InvalidSignature:
        raise ReceiptError("the signature does not match: the receipt was altered") from None
    return fields


def _key_file(data_dir: Path) -> Path:
    return data_dir / "receipts" / "keys.json"


def _data_dir_seeds(path: Path) -> list[tuple[str, bytes]]:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        seed = key.private_bytes_raw()
        # Unique among processes sharing the directory: routers in containers sharing one
        # volume all run as pid 1, and a shared name let one truncate another's key file.
        tmp = path.with_name(f"keys.{os.getpid()}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps([{"kid": kid_of(key.public_key()), "seed": _b64(seed)}]))
        try:
            os.link(tmp, path)  # the first process to get here wins; the others read its key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return _read_seeds(path)


def _read_seeds(path: Path) -> list[tuple[str, bytes]]:
    entries = orjson.loads(path.read_bytes())
    return [(e["kid"], _unb64(e["seed"])) for e in entries]
