"""Sub-key retention: a child's spend per UTC day (`sub_key_daily`) is read for today only,
so older days go, in batches. `server/retention.py` runs it with the ledger's and the
orders', whatever APIFAST_ORDER_RETENTION_DAYS says."""

from __future__ import annotations

import asyncpg

from apifast.db import Queries

Q = Queries("apifast.router")


async def delete_past_sub_key_days(conn: asyncpg.Connection, batch: int) -> int:
    """Delete up to `batch` rows of days before the day before yesterday; how many were."""
    deleted = await conn.fetchval(Q.sub_key_daily_delete_past, batch)
    return int(deleted)
