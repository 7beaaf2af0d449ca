"""Numbered migrations, each feature's in its own `migrations/postgres/NNNN_name.sql` folder.

The numbers are global (unique across features), so the whole schema has one order. All
pending steps are applied in one transaction, under an advisory lock so that concurrent
starters do not race; the applied versions are kept in `schema_migrations`.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

import asyncpg

_LOCK_ID = 0x41504946  # "APIF"


def migration_files(
    packages: Sequence[str], engine: str = "postgres"
) -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration of `packages` for `engine`, in order."""
    found = []
    for package in packages:
        folder = resources.files(package).joinpath("migrations", engine)
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.endswith(".sql"):
                version = int(entry.name.split("_", 1)[0])
                found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"duplicate {engine} migration numbers: {versions}")
    return found


async def migrate(dsn_or_conn: str | asyncpg.Connection, packages: Sequence[str]) -> list[str]:
    """Apply pending Postgres migrations of `packages`; returns the names applied."""
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
            for version, name, sql in migration_files(packages):
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
