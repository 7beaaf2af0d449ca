"""Postgres side of metering: debit a batch of usage events exactly once."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg

from apifast.db import Queries

Q = Queries("apifast.metering")


async def debit_batch(pool: asyncpg.Pool, events: list[dict[str, Any]]) -> set[str]:
    """Debit each event's cost and release its hold, in one transaction; events already in
    the ledger are skipped. Returns the generation ids counted by this call."""
    ids = [e["generation_id"] for e in events]
    hashes = [bytes.fromhex(e["key_hash"]) for e in events]
    costs = [Decimal(e["cost_usd"]) for e in events]
    async with pool.acquire() as conn, conn.transaction():
        # Reservation batches lock keys in key-hash order; taking ours in the same order
        # first means the two can never deadlock.
        await conn.execute(Q.lock_keys_in_order, sorted(set(hashes)))
        rows = await conn.fetch(Q.settle_usage_batch, ids, hashes, costs)
    return {r["generation_id"] for r in rows}


async def release_expired(pool: asyncpg.Pool) -> None:
    await pool.execute(Q.release_expired_reservations)
