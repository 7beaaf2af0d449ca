"""Postgres side of metering: debit a batch of usage events exactly once."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from apifast.db import Queries

Q = Queries("apifast.metering")


def capped_debit(event: dict[str, Any]) -> tuple[Decimal, Decimal]:
    """(debit, overage) of an event: the debit is at most the event's hold, whatever its
    cost says (the router caps it already; this holds for any publisher)."""
    cost = Decimal(str(event["cost_usd"]))
    overage = Decimal(str(event.get("overage_usd", "0")))
    held = event.get("reserved_usd")
    if held is not None and cost > (limit := Decimal(str(held))):
        overage += cost - limit
        cost = limit
    return cost, overage


def _count(event: dict[str, Any], name: str) -> int:
    value = event.get(name)
    return value if type(value) is int and value > 0 else 0


async def debit_batch(pool: asyncpg.Pool, events: list[dict[str, Any]]) -> set[str]:
    """Debit each event's cost (capped at its hold; the excess recorded as an overage) and
    release its hold, in one transaction; events already in the ledger are skipped. Returns
    the generation ids counted by this call."""
    ids = [e["generation_id"] for e in events]
    hashes = [bytes.fromhex(e["key_hash"]) for e in events]
    debits = [capped_debit(e) for e in events]
    costs = [d for d, _ in debits]
    overages = [o for _, o in debits]
    models = [str(e.get("model", "")) for e in events]
    leases = [str(e.get("lease") or "") for e in events]
    tokens = [_count(e, "input_tokens") + _count(e, "output_tokens") for e in events]
    async with pool.acquire() as conn, conn.transaction():
        # Reservation batches lock keys in key-hash order; taking ours in the same order
        # first means the two can never deadlock.
        await conn.execute(Q.lock_keys_in_order, sorted(set(hashes)))
        rows = await conn.fetch(
            Q.settle_usage_batch, ids, hashes, costs, overages, models, leases, tokens
        )
    return {r["generation_id"] for r in rows}


async def record_checkpoints(pool: asyncpg.Pool, events: list[dict[str, Any]]) -> None:
    """Keep the latest checkpoint of each running stream (see `checkpoint` in event.py)."""
    latest: dict[str, dict[str, Any]] = {}
    for event in events:
        kept = latest.get(event["generation_id"])
        if kept is None or kept["checkpoint"] < event["checkpoint"]:
            latest[event["generation_id"]] = event
    await pool.execute(
        Q.checkpoints_upsert,
        list(latest),
        [e["checkpoint"] for e in latest.values()],
        [orjson.dumps(e).decode() for e in latest.values()],
    )


async def abandoned_streams(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    """The final events to bill for streams whose router died: their latest checkpoints."""
    rows = await pool.fetch(Q.abandoned_stream_checkpoints)
    return [{**orjson.loads(r["event"]), "checkpoint": 0} for r in rows]


async def drop_settled_checkpoints(pool: asyncpg.Pool) -> None:
    await pool.execute(Q.delete_orphan_checkpoints)


async def release_expired(pool: asyncpg.Pool) -> None:
    await pool.execute(Q.release_expired_reservations)
    await pool.execute(Q.prune_rate_windows)


async def delete_old_overages(conn: asyncpg.Connection, before: datetime) -> int:
    """Order and ledger retention: drop the overage records of requests before `before`."""
    status = await conn.execute(Q.usage_overages_expire, before)
    return int(status.split()[-1])
