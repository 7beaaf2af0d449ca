"""`apifast reconcile`: after real traffic through the stack, the two stores are made to
disagree in every way they can, and reconcile finds each difference by generation id,
repairs what can be repaired (exactly once, however often it runs) and flags the rest."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from apifast.cli.main import COMMANDS, build_parser
from apifast.keys import hash_key
from apifast.metering.event import EVENT_COLUMNS
from apifast.metering.reconcile import reconcile
from tests.harness import SECRET, Stack

BODY = {"model": "fast-chat", "messages": [{"role": "user", "content": "count me"}]}


async def _ch(stack: Stack, sql: str, **params: Any) -> list[dict[str, Any]]:
    return await stack.state.clickhouse.query(sql, params)  # type: ignore[no-any-return]


async def _ch_row(stack: Stack, generation_id: str) -> list[dict[str, Any]]:
    return await _ch(
        stack,
        "SELECT model, input_tokens, output_tokens, cost_usd, outcome FROM usage_events "
        "WHERE generation_id = {g:String}",
        g=generation_id,
    )


async def test_reconcile_finds_and_repairs_every_kind_of_difference(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    key = await stack.create_key("5.00")
    key_hash = hash_key(SECRET.encode(), key)
    async with stack.client(key) as c:
        ids = [(await c.post("/v1/chat/completions", json=BODY)).json()["id"] for _ in range(5)]
    await stack.wait_metered(ids)
    lost_row, duplicated, mismatched = ids[0], ids[1], ids[2]
    store = stack.state.clickhouse

    # Debited, but its ClickHouse row is gone (the stream still has the event).
    await store.command(f"DELETE FROM usage_events WHERE generation_id = '{lost_row}'")
    # Two rows for one event.
    row = (await _ch(stack, "SELECT * FROM usage_events WHERE generation_id = {g:String}",
                     g=duplicated))[0]  # fmt: skip
    await asyncio.get_running_loop().run_in_executor(
        store._executor,  # chdb must be used from its one thread
        lambda: store._client.insert(
            "usage_events", [[row[c] for c in EVENT_COLUMNS]], column_names=EVENT_COLUMNS
        ),
    )
    # The two stores disagree on a cost.
    await stack.pool.execute(
        "UPDATE ledger SET amount_usd = amount_usd - 0.000001 WHERE ref = $1", mismatched
    )
    # Debited, never published (so the stream cannot help): only the ledger knows it.
    orphan_debit = "gen-orphan-debit"
    await stack.pool.execute(
        "INSERT INTO ledger (key_id, kind, ref, amount_usd) "
        "SELECT id, 'usage', $2, -0.000123 FROM api_keys WHERE key_hash = $1",
        key_hash, orphan_debit,
    )  # fmt: skip
    # In ClickHouse, never debited.
    undebited = "gen-undebited"
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    await store.insert_new_events([{
        "generation_id": undebited, "key_hash": key_hash.hex(), "model": "fast-chat",
        "cost_usd": "0.000200", "ts": now_ms, "input_tokens": 3, "output_tokens": 4,
    }])  # fmt: skip
    balance_before = await stack.pool.fetchval(
        "SELECT balance_usd FROM api_keys WHERE key_hash = $1", key_hash
    )

    start = datetime.now(UTC) - timedelta(hours=1)
    end = datetime.now(UTC) + timedelta(hours=1)
    report = await reconcile(stack.settings, start, end)
    assert not report.clean
    assert report.missing_in_clickhouse == sorted([lost_row, orphan_debit])
    assert report.missing_in_ledger == [undebited]
    assert [m.generation_id for m in report.mismatched] == [mismatched]
    assert report.duplicated_in_clickhouse == [duplicated]
    (totals,) = report.keys
    # 5 requests + the orphan debit; 5 requests - the lost row + the undebited row.
    assert totals.ledger_events == 6 and totals.clickhouse_events == 5
    # The views counted the duplicate twice and the lost row before it was lost: the
    # rollups count more than the raw events (the group of each sum rollup).
    assert not any(d.short for d in report.rollup_differences)
    assert {d.table for d in report.rollup_differences} == {
        "usage_key_daily", "usage_hourly", "usage_daily"
    }  # fmt: skip

    repaired = await reconcile(stack.settings, start, end, repair=True)
    assert repaired.repaired == {
        "clickhouse rows from the stream": 1,
        "clickhouse rows rebuilt from the ledger": 1,
        "ledger debits": 1,
        "clickhouse duplicates collapsed": 1,
        # Restored, it was counted again; the duplicate was collapsed: rebuilt from the rows.
        "rollup groups rebuilt": len(report.rollup_differences),
    }
    # Only the cost disagreement is left: money is never changed by a guess.
    assert repaired.missing_in_clickhouse == repaired.missing_in_ledger == []
    assert repaired.duplicated_in_clickhouse == []
    assert repaired.rollup_differences == []
    assert [m.generation_id for m in repaired.mismatched] == [mismatched]
    assert any(orphan_debit in note for note in repaired.flagged)

    # The lost row came back whole, from the stream; the orphan debit is a flagged stand-in.
    (restored,) = await _ch_row(stack, lost_row)
    assert restored["model"] == "fast-chat" and restored["input_tokens"] > 0
    (rebuilt,) = await _ch_row(stack, orphan_debit)
    assert rebuilt["outcome"] == "reconciled" and rebuilt["cost_usd"] == Decimal("0.000123")
    assert len(await _ch_row(stack, duplicated)) == 1
    # The undebited usage was debited exactly once, however often reconcile runs.
    again = await reconcile(stack.settings, start, end, repair=True)
    assert "ledger debits" not in again.repaired
    assert not any(name.startswith("rollup") for name in again.repaired)
    balance_after = await stack.pool.fetchval(
        "SELECT balance_usd FROM api_keys WHERE key_hash = $1", key_hash
    )
    assert balance_before - balance_after == Decimal("0.000200")

    # The command: JSON report, exit status 1 while a difference remains.
    args = build_parser().parse_args([
        "reconcile", "--from", start.isoformat(), "--to", end.isoformat(), "--json",
    ])  # fmt: skip
    handler = COMMANDS[("reconcile", None)]
    capsys.readouterr()
    status = await asyncio.to_thread(handler, stack.settings, args)
    out = json.loads(capsys.readouterr().out)
    assert status == 1 and out["clean"] is False
    assert [m["generation_id"] for m in out["mismatched"]] == [mismatched]


def test_reconcile_dates_cover_whole_days() -> None:
    args = build_parser().parse_args(["reconcile", "--from", "2026-01-01", "--to", "2026-01-31"])
    from apifast.cli.reconcile import _moment

    assert _moment(args.start, end=False) == datetime(2026, 1, 1, tzinfo=UTC)
    assert _moment(args.end, end=True) == datetime(2026, 2, 1, tzinfo=UTC)


async def _usage_and_ledger(stack: Stack, key: str) -> tuple[dict[str, Any], int, Decimal]:
    async with stack.client(key) as c:
        usage = (await c.get("/v1/usage")).json()
    key_hash = hash_key(SECRET.encode(), key)
    row = await stack.pool.fetchrow(
        "SELECT count(*) AS n, coalesce(-sum(l.amount_usd), 0) AS usd FROM ledger l "
        "JOIN api_keys k ON k.id = l.key_id WHERE l.kind = 'usage' AND k.key_hash = $1",
        key_hash,
    )
    return usage, int(row["n"]), Decimal(row["usd"])


async def test_reconcile_finds_and_repairs_short_rollups(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    counted, uncounted = await stack.create_key("5.00"), await stack.create_key("5.00")
    async with stack.client(counted) as c:
        ids = [(await c.post("/v1/chat/completions", json=BODY)).json()["id"] for _ in range(3)]
    await stack.wait_metered(ids)
    store = stack.state.clickhouse
    views = ("usage_hourly_mv", "usage_daily_mv", "active_keys_hourly_mv",
             "active_keys_daily_mv", "usage_key_daily_mv")  # fmt: skip
    # What a meter killed mid-insert leaves: raw rows the views never saw.
    for view in views:
        await store.command(f"DETACH TABLE {view}")
    try:
        more = []
        for key in (counted, uncounted):
            async with stack.client(key) as c:
                more += [(await c.post("/v1/chat/completions", json=BODY)).json()["id"]
                         for _ in range(2)]  # fmt: skip
        await stack.wait_metered(more)
    finally:
        for view in views:
            await store.command(f"ATTACH TABLE {view}")
    usage, n, usd = await _usage_and_ledger(stack, uncounted)
    assert (usage["total_requests"], n) == (0, 2)  # /v1/usage is short: the bug

    start = datetime.now(UTC) - timedelta(hours=1)
    end = datetime.now(UTC) + timedelta(hours=1)
    report = await reconcile(stack.settings, start, end)
    assert not report.clean
    assert report.missing_in_clickhouse == report.missing_in_ledger == []
    diffs = report.rollup_differences
    assert all(d.short for d in diffs)
    # Every rollup is short; the uncounted key is missing from the active keys too.
    assert {d.table for d in diffs} == {"usage_key_daily", "usage_hourly", "usage_daily",
                                        "active_keys_hourly", "active_keys_daily"}  # fmt: skip
    for table in ("usage_key_daily", "usage_hourly", "usage_daily"):
        assert sum(d.raw["requests"] - d.rollup["requests"] for d in diffs if d.table == table) == 4
    sums = [d for d in diffs if d.table.startswith("usage_")]
    assert all(d["short"] for d in json.loads(report.to_json())["rollup_differences"])

    # The command reports them (exit 1), in its text and as new JSON fields.
    handler = COMMANDS[("reconcile", None)]
    argv = ["reconcile", "--from", start.isoformat(), "--to", end.isoformat()]
    capsys.readouterr()
    assert await asyncio.to_thread(handler, stack.settings, build_parser().parse_args(argv)) == 1
    text = capsys.readouterr().out
    assert "rollup short usage_key_daily" in text and "DIFFERENCES FOUND" in text
    args = build_parser().parse_args([*argv, "--json", "--repair"])
    assert await asyncio.to_thread(handler, stack.settings, args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clean"] is True and out["rollup_differences"] == []
    assert out["repaired"] == {
        "rollup groups corrected": len(sums),
        "rollup periods given their keys again": len(diffs) - len(sums),
    }

    # /v1/usage adds up to the ledger again, for both keys.
    for key in (counted, uncounted):
        usage, n, usd = await _usage_and_ledger(stack, key)
        assert usage["total_requests"] == n and Decimal(usage["total_cost_usd"]) == usd
    # Repairing again adds nothing: each correction is the difference to the current rollup.
    from apifast.metering.rollups import Scope

    again = await store.repair_rollups(Scope.between(start, end))
    assert again.corrected == again.rebuilt == {} and again.keys_added == 0
    after = await reconcile(stack.settings, start, end)
    assert after.clean, after.to_text()
