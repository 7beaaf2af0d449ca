"""ClickHouse through clickhouse-connect: the embedded chdb engine (`chdb:///path`) or a
server (`http://host:8123`). The client is synchronous, so every call runs on one worker
thread (chdb must not be used from two threads at once)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import clickhouse_connect

from apifast.db.migrate import migration_files
from apifast.metering import rollups
from apifast.metering.event import EVENT_COLUMNS, event_row

T = TypeVar("T")
log = logging.getLogger("apifast.meter")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# What retention applies to, with their time column: the tables that hold a key hash per row,
# and the distinct-key states (uniqCombined keeps the hashes of small sets exactly).
_RETAINED = (
    ("usage_events", "toDateTime(ts)"),
    ("usage_key_daily", "day"),
    ("active_keys_hourly", "period"),
    ("active_keys_daily", "period"),
)


class ClickHouseStore:
    def __init__(self, url: str, database: str = "apifast") -> None:
        if not _NAME.match(database):
            raise ValueError(f"invalid ClickHouse database name: {database!r}")
        self.url = url
        self.database = database
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._client: Any = None
        self.rollup_corrections = 0  # correction rows the meter added, for tests and logs

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _connect(self) -> None:
        admin = clickhouse_connect.get_client(dsn=self.url)
        admin.command(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        self._client = clickhouse_connect.get_client(dsn=self.url, database=self.database)

    def _migrate(self) -> list[str]:
        c = self._client
        c.command(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
            "applied_at DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY version"
        )
        done = {r[0] for r in c.query("SELECT version FROM schema_migrations").result_rows}
        applied = []
        for version, name, sql in migration_files(["apifast.metering"], "clickhouse"):
            if version in done:
                continue
            for statement in _statements(sql):
                c.command(statement)
            c.insert("schema_migrations", [[version, name]], column_names=["version", "name"])
            applied.append(name)
        return applied

    async def start(self) -> list[str]:
        """Connect and apply pending ClickHouse migrations."""
        await self._run(self._connect)
        return await self._run(self._migrate)

    async def apply_retention(self, days: int) -> None:
        """Keep raw usage events, the per-key daily rollup and the distinct-key states `days`
        days (0: for ever). Past it, what remains is model-level only: usage_hourly and
        usage_daily carry no key."""
        await self._run(self._apply_retention, days)

    def _apply_retention(self, days: int) -> None:
        c = self._client
        for table, column in _RETAINED:
            current = c.query(
                "SELECT create_table_query FROM system.tables "
                "WHERE database = {db:String} AND name = {t:String}",
                parameters={"db": self.database, "t": table},
            ).result_rows
            has_ttl = bool(current) and " TTL " in current[0][0]
            if days:
                ttl = f"TTL {column} + toIntervalDay({int(days)})"
                if not (has_ttl and ttl in current[0][0].replace("\n", " ")):
                    c.command(f"ALTER TABLE {table} MODIFY {ttl}")
            elif has_ttl:
                c.command(f"ALTER TABLE {table} REMOVE TTL")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._run(client.close)
        self._executor.shutdown(wait=False)

    # --- writes (the meter) ---

    def _insert_new(self, events: Sequence[dict[str, Any]]) -> int:
        ids = [e["generation_id"] for e in events]
        existing = {
            r[0]
            for r in self._client.query(
                "SELECT generation_id FROM usage_events WHERE generation_id IN {ids:Array(String)}",
                parameters={"ids": ids},
            ).result_rows
        }
        rows, seen = [], set(existing)
        for event in events:
            if event["generation_id"] not in seen:
                seen.add(event["generation_id"])
                rows.append(event_row(event))
        if rows:
            self._client.insert("usage_events", rows, column_names=EVENT_COLUMNS)
        if existing:
            # A redelivery: the insert that stored these may have died before every view
            # had its rows (rollups.py). Only this rare path pays for the check.
            self._repair_rollups([e for e in events if e["generation_id"] in existing])
        return len(rows)

    def _repair_rollups(self, stored: Sequence[dict[str, Any]]) -> None:
        repair = rollups.repair_for_events(self._client, stored)
        added = sum(repair.corrected.values())
        self.rollup_corrections += added
        if added:
            log.warning("meter: rollups were short after a failed insert; added %d correction "
                        "rows (%s)", added, ", ".join(sorted(repair.corrected)))  # fmt: skip
        if repair.above:
            log.warning("meter: %d rollup groups count more than the raw events; "
                        "run `apifast reconcile --repair`", len(repair.above))  # fmt: skip

    async def insert_new_events(self, events: Sequence[dict[str, Any]]) -> int:
        """Insert the events not already stored, and repair the rollups of those that were
        (a redelivery after a failed insert); returns how many were inserted."""
        return await self._run(self._insert_new, events)

    # --- the rollups (apifast reconcile) ---

    async def rollup_differences(self, scope: rollups.Scope) -> list[rollups.RollupDifference]:
        """Every rollup group in `scope` that disagrees with the raw events."""

        def check() -> list[rollups.RollupDifference]:
            return [
                *rollups.find_differences(self._client, scope),
                *rollups.find_key_differences(self._client, scope),
            ]

        return await self._run(check)

    async def repair_rollups(self, scope: rollups.Scope) -> rollups.RollupRepair:
        """Make every rollup group in `scope` agree with the raw events again."""
        return await self._run(rollups.repair_scope, self._client, scope)

    # --- reads ---

    def _query(self, sql: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        result = self._client.query(sql, parameters=parameters)
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]

    async def query(self, sql: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        return await self._run(self._query, sql, parameters)

    async def command(self, sql: str) -> Any:
        return await self._run(self._client.command, sql)


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
