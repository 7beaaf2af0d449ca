"""The one Postgres round trip on the request path: authenticate the key and hold money."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from apifast.db import Queries
from apifast.money import format_usd
from router.errors import ApiError

Q = Queries()

# Postgres unreachable (rather than a bug): refused, cut, shutting down, or gone.
DATABASE_DOWN = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.exceptions.OperatorInterventionError,
)


@dataclass(slots=True, frozen=True)
class Hold:
    key_id: int
    reserved: Decimal
    available: Decimal
    rpm_limit: int | None
    tpm_limit: int | None


async def reserve(
    pool: asyncpg.Pool,
    key_hash: bytes,
    generation_id: str,
    min_usd: Decimal,
    max_usd: Decimal,
    ttl_s: int,
) -> Hold:
    """Hold between `min_usd` and `max_usd` of the key's available balance, or refuse."""
    try:
        row = await pool.fetchrow(Q.reserve, key_hash, generation_id, min_usd, max_usd, ttl_s)
    except DATABASE_DOWN:
        # No hold, no service: a paid request is never served unbilled.
        raise ApiError(
            503,
            "The billing database is unavailable; retry shortly.",
            code="database_unavailable",
            headers={"Retry-After": "5"},
        ) from None
    assert row is not None
    status = row["status"]
    if status == "ok":
        return Hold(
            key_id=row["key_id"],
            reserved=row["reserved_usd"],
            available=row["available_usd"],
            rpm_limit=row["rpm_limit"],
            tpm_limit=row["tpm_limit"],
        )
    if status == "unknown":
        raise ApiError(401, "Invalid API key.", code="invalid_api_key")
    if status == "disabled":
        raise ApiError(401, "This API key has been disabled.", code="key_disabled")
    available = row["available_usd"]
    raise ApiError(
        402,
        f"Balance too low: this request needs at least ${format_usd(min_usd)} available, "
        f"the key has ${format_usd(max(available, Decimal(0)))} (after requests in flight). "
        "Top up with POST /v1/orders.",
        code="insufficient_balance",
    )


async def release(pool: asyncpg.Pool, generation_id: str) -> None:
    await pool.execute(Q.release_reservation, generation_id)
