"""Ledger retention: rows before a cutoff are summed into one `carried_forward` row per key
and deleted, so that each key's ledger sums to the same total. Balances (`api_keys`) are not
touched. `server/retention.py` runs it (APIFAST_ORDER_RETENTION_DAYS)."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from apifast.db import Queries

Q = Queries("apifast")


async def carry_ledger_forward(conn: asyncpg.Connection, before: datetime, batch: int) -> int:
    """Carry forward up to `batch` rows booked before `before`; how many were."""
    row = await conn.fetchrow(Q.ledger_carry_forward, before, batch)
    assert row is not None
    return int(row["deleted"])
