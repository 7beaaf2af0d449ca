"""Applies numbered migrations from `migrations/postgres/NNNN_name.sql`, all pending ones in
one transaction, under an advisory lock so that concurrent starters do not race."""

from __future__ import annotations

from importlib import resources

import asyncpg

_LOCK_ID = 0x41504946  # "APIF"


def migration_files(engine: str) -> list[tuple[int, str, str]]:
    folder = resources.files("apifast.db").joinpath("migrations", engine)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"duplicate {engine} migration numbers: {versions}")
    return found


async def migrate(dsn_or_conn: str | asyncpg.Connection) -> list[str]:
    """Apply pending Postgres migrations; returns the names applied (empty when up to date)."""
    conn = await asyncpg.connect(dsn_or_conn) if isinstance(dsn_or_conn, str) else dsn_or_conn
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            applied = []
            for version, name, sql in migration_files("postgres"):
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
                applied.append(name)
            return applied
    finally:
        if isinstance(dsn_or_conn, str):
            await conn.close()
