"""Probes into a meter's chdb data for the rollup tests, run as a separate process (a chdb
path opens in one process only, and the meter under test owns it while it runs):

    python -m tests.rollup_probe CHDB_PATH DATABASE gate URL   # pause inserts at URL
    python -m tests.rollup_probe CHDB_PATH DATABASE ungate
    python -m tests.rollup_probe CHDB_PATH DATABASE state      # JSON: raw vs rollups

The gate is a materialized view on `usage_events` into a URL-engine table: while the test's
HTTP server on 127.0.0.1 holds the request, the meter is provably inside its ClickHouse
insert, after the raw rows and before (some of) the rollup views."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from apifast.metering.clickhouse import ClickHouseStore
from apifast.metering.rollups import Scope

REPO = Path(__file__).resolve().parent.parent


async def _probe(chdb_path: str, database: str, command: str, args: list[str]) -> dict[str, Any]:
    store = ClickHouseStore(f"chdb://{chdb_path}", database)
    await store.start()  # applies the migrations, as the meter will
    try:
        if command == "gate":
            await store.command(
                "CREATE TABLE IF NOT EXISTS probe_gate (generation_id String) "
                f"ENGINE = URL('{args[0]}', JSONEachRow)"
            )
            await store.command(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS probe_gate_mv TO probe_gate "
                "AS SELECT generation_id FROM usage_events"
            )
            return {}
        if command == "ungate":
            await store.command("DROP VIEW IF EXISTS probe_gate_mv")
            await store.command("DROP TABLE IF EXISTS probe_gate")
            return {}
        raw = (await store.query(
            "SELECT count() AS n, sum(cost_usd) AS cost, min(ts) AS lo, max(ts) AS hi "
            "FROM usage_events FINAL", {},
        ))[0]  # fmt: skip
        rollup = (await store.query(
            "SELECT sum(requests) AS n, sum(cost_usd) AS cost FROM usage_key_daily", {}
        ))[0]  # fmt: skip
        differences = []
        if raw["n"]:
            scope = Scope.between(raw["lo"], raw["hi"] + timedelta(seconds=1))
            differences = [d.table for d in await store.rollup_differences(scope)]
        return {
            "raw_events": raw["n"], "raw_cost": str(raw["cost"]),
            "key_daily_requests": rollup["n"], "key_daily_cost": str(rollup["cost"]),
            "differences": differences,
        }  # fmt: skip
    finally:
        await store.close()


def run_probe(chdb_path: Path, database: str, command: str, *args: str) -> dict[str, Any]:
    """Run one probe in its own process; its JSON answer."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.rollup_probe", str(chdb_path), database, command, *args],
        capture_output=True, check=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    path, db, cmd, *rest = sys.argv[1:]
    print(json.dumps(asyncio.run(_probe(path, db, cmd, rest))))
