"""Order retention: orders closed before a cutoff go, with their payments and history. An
open order stays, however old. `server/retention.py` runs it with the ledger's."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from apifast.db import Queries

Q = Queries("apifast.orders")


async def delete_closed_orders(
    conn: asyncpg.Connection, before: datetime, batch: int
) -> tuple[int, int, int]:
    """Delete up to `batch` orders closed before `before`: (orders, payments, events)."""
    row = await conn.fetchrow(Q.orders_delete_closed, before, batch)
    assert row is not None
    return int(row["orders"]), int(row["payments"]), int(row["events"])
