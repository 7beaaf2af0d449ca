"""Creating and crediting keys outside a request (the CLI, orders, the admin panel)."""

from __future__ import annotations

from decimal import Decimal

import asyncpg

from apifast.db import Queries
from apifast.keys import generate_key, hash_key, key_prefix

Q = Queries("apifast")


async def insert_key(
    conn: asyncpg.Connection, secret: bytes, credit: Decimal = Decimal(0)
) -> tuple[str, int, Decimal]:
    """Create a key (and its initial credit) on `conn`; returns (key, key id, balance)."""
    key = generate_key()
    row = await conn.fetchrow(Q.create_key, hash_key(secret, key), key_prefix(key))
    assert row is not None
    balance = Decimal(0)
    if credit:
        balance = await conn.fetchval(
            Q.credit_key, row["id"], "initial_credit", f"key:{row['id']}", credit, "keys create"
        )
    return key, row["id"], balance


async def create_key(
    dsn: str,
    secret: bytes,
    credit: Decimal,
    *,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
) -> tuple[str, Decimal]:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            key, key_id, balance = await insert_key(conn, secret, credit)
            if rpm_limit or tpm_limit:
                await conn.execute(Q.set_key_limits, key_id, rpm_limit, tpm_limit)
        return key, balance
    finally:
        await conn.close()
