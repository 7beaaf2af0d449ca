"""Bearer-key parsing and hashing. Shape and checksum are checked before any database use."""

from __future__ import annotations

from typing import Any

import asyncpg
from starlette.requests import Request

from apifast.db import Queries
from apifast.errors import ApiError
from apifast.keys import hash_key, is_well_formed

_Q = Queries("apifast")


def bearer_key(request: Request) -> str:
    return bearer_key_from_header(request.headers.get("authorization"))


def bearer_key_from_header(header: str | None) -> str:
    if not header:
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer af-...'.",
            code="missing_api_key",
        )
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, "Authorization must be 'Bearer <key>'.", code="invalid_api_key")
    if not is_well_formed(key):
        raise ApiError(
            401,
            "Invalid API key (bad format or checksum; check for a typo).",
            code="invalid_api_key",
        )
    return key


def key_hash_from_request(request: Request, secret: bytes) -> bytes:
    return hash_key(secret, bearer_key(request))


def key_hash_from_header(header: str | None, secret: bytes) -> bytes:
    return hash_key(secret, bearer_key_from_header(header))


async def key_summary(
    request: Request, pool: asyncpg.Pool, secret: bytes
) -> tuple[bytes, dict[str, Any]]:
    """The calling key's hash and its summary row (balance, limits); 401 for an unknown key."""
    key_hash = key_hash_from_request(request, secret)
    return key_hash, await key_row(pool, key_hash)


async def key_row(pool: asyncpg.Pool, key_hash: bytes) -> dict[str, Any]:
    """The key's summary row (balance, limits, disabled); 401 for an unknown key."""
    row = await pool.fetchrow(_Q.key_summary, key_hash)
    if row is None:
        raise ApiError(401, "Invalid API key.", code="invalid_api_key")
    return dict(row)


def refuse_sub_key(row: dict[str, Any]) -> None:
    """403 for a sub-key where only the key holder (the parent key) may act: keys, orders,
    rotation, recovery email and alerts. A sub-key never reads or changes its parent's data."""
    if row.get("parent_id") is not None:
        raise ApiError(
            403,
            "A sub-key cannot do this; use the key holder's own key.",
            code="sub_key_not_allowed",
        )


# Why a key no longer works: 401 wherever it is used, the same for its requests (the holds'
# statuses: router/reservations.py) as for reading its history.
_GONE = {
    "disabled": ("This API key has been disabled.", "key_disabled"),
    "expired": ("This sub-key has expired.", "key_expired"),
    "parent_disabled": ("The key this sub-key draws on has been disabled.", "key_disabled"),
}


def gone_refusal(status: str | None) -> ApiError | None:
    """The 401 of a disabled key, an expired sub-key or one whose parent is disabled; None
    for any other status."""
    gone = _GONE.get(status or "")
    return None if gone is None else ApiError(401, gone[0], code=gone[1])


def refuse_inactive_sub_key(row: Any) -> None:
    """401 for a disabled or expired sub-key, or one whose parent is disabled: its holder
    turned it off, so it reads nothing either (`sub_key_status` of key_summary.sql)."""
    refusal = gone_refusal(row["sub_key_status"])
    if refusal is not None:
        raise refusal


async def history_hashes(request: Request, pool: asyncpg.Pool, secret: bytes) -> list[bytes]:
    """The hashes whose history the calling key reads: its own first, then those of the keys
    it was rotated from (a rotation moves the history with the balance). 401 for an unknown
    key, and for a key rotated away: its history went to the new key."""
    key_hash = key_hash_from_request(request, secret)
    row = await pool.fetchrow(_Q.key_history, key_hash)
    if row is None:
        raise ApiError(401, "Invalid API key.", code="invalid_api_key")
    if row["rotated"]:
        raise ApiError(401, "This API key has been rotated; use the new key.", code="key_disabled")
    refuse_inactive_sub_key(row)
    return [key_hash, *(bytes(h) for h in row["predecessors"])]


async def holder_summary(
    request: Request, pool: asyncpg.Pool, secret: bytes
) -> tuple[bytes, dict[str, Any]]:
    """`key_summary` for the key holder's own endpoints: 403 for a sub-key."""
    key_hash, row = await key_summary(request, pool, secret)
    refuse_sub_key(row)
    return key_hash, row
