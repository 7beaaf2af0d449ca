"""Which features own Postgres migrations, in the order they were written."""

from __future__ import annotations

import asyncpg

from apifast.db.migrate import migrate

# Migration numbers are unique across features, so this order is only for reading.
MIGRATION_PACKAGES = (
    "apifast",
    "apifast.orders",
    "apifast.admin",
    "apifast.router",
    "apifast.metering",
)


async def migrate_database(dsn_or_conn: str | asyncpg.Connection) -> list[str]:
    """Apply every feature's pending Postgres migrations; returns the names applied."""
    return await migrate(dsn_or_conn, MIGRATION_PACKAGES)
