"""The key holder's dashboard and its API, the overview's figures, and the ClickHouse rollups
behind them (exact, and never double counting a redelivered event)."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from apifast.admin.analytics import window_for
from apifast.db import Queries
from apifast.metering.clickhouse import ClickHouseStore
from tests.admin_support import AdminClient, admin, admin_stack
from tests.harness import Stack

__all__ = ["admin", "admin_stack"]
Q = Queries("apifast.admin")
RQ = Queries("apifast.router")
STATIC = Path(__file__).resolve().parent.parent / "admin" / "static"


async def chat(stack: Stack, key: str, text: str = "hello", status: int = 200) -> str:
    async with stack.client(key) as c:
        r = await c.post("/v1/chat/completions",
                         json={"model": "fast-chat", "messages": [{"role": "user", "content": text}]})  # fmt: skip
        assert r.status_code == status, r.text
        return str(r.json().get("id"))


async def wait_generations(stack: Stack, key: str, count: int, timeout: float = 20) -> None:
    """Wait until the meter has written `count` of the key's requests to ClickHouse."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with stack.client(key) as c:
        while len((await c.get("/v1/generations")).json()["data"]) < count:
            assert asyncio.get_running_loop().time() < deadline, "events never metered"
            await asyncio.sleep(0.05)


async def test_dashboard_page_is_self_contained(admin_stack: Stack):
    async with admin_stack.client() as c:
        r = await c.get("/dashboard")
        assert r.status_code == 200
        assert "set-cookie" not in r.headers
        csp = r.headers["content-security-policy"]
        for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'",
                          "form-action 'none'", "frame-ancestors 'none'"):  # fmt: skip
            assert directive in csp
        assert r.headers["referrer-policy"] == "no-referrer"
        sources = set(re.findall(r'(?:src|href)="([^"]+)"', r.text)) - {"data:,"}  # no favicon
        assert sources and all(s.startswith("/assets/") for s in sources), sources
        for src in sources:
            asset = await c.get(src)
            assert asset.status_code == 200 and "set-cookie" not in asset.headers
    for path in STATIC.iterdir():
        text = path.read_text()
        # The only URL in the assets is SVG's XML namespace, which is never fetched.
        assert set(re.findall(r"https?://[^\s\"')]+", text)) <= {"http://www.w3.org/2000/svg"}
        assert (
            "cookie" not in text.lower()
            or path.name != "dashboard.js"
            or ("No cookies are read or written" in text)
        )
    assert "localStorage" not in (STATIC / "dashboard.js").read_text()


async def test_generations_lists_only_the_callers_requests(admin_stack: Stack):
    stack = admin_stack
    mine, other = await stack.create_key("1.00"), await stack.create_key("1.00")
    ids = [await chat(stack, mine), await chat(stack, mine), await chat(stack, other)]
    await stack.wait_metered(ids)
    async with stack.client(mine) as c:
        body = (await c.get("/v1/generations")).json()
        assert [g["id"] for g in body["data"]] == [ids[1], ids[0]]
        g = body["data"][0]
        assert g["model"] == "fast-chat" and g["status"] == 200 and Decimal(g["cost_usd"]) > 0
        assert set(g) >= {"input_tokens", "output_tokens", "latency_ms", "created_at"}
        assert "provider" not in g and "upstream_model" not in g
        one = (await c.get("/v1/generations", params={"limit": 1})).json()
        assert len(one["data"]) == 1 and one["has_more"] is True
        bad = await c.get("/v1/generations", params={"limit": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    async with stack.client() as c:
        assert (await c.get("/v1/generations")).status_code == 401


async def test_overview_shows_usage_revenue_and_latency(admin: AdminClient):
    stack = admin.stack
    key = await stack.create_key("3.00")
    await chat(stack, key)
    await chat(stack, key, "[[error:500]]", status=502)
    await wait_generations(stack, key, 2)
    await stack.pool.execute(
        "INSERT INTO ledger (key_id, kind, ref, amount_usd) "
        "SELECT id, 'payment', 'test-payment', 12.5 FROM api_keys LIMIT 1"
    )
    page = await admin.get("/admin/", params={"range": "24h"})
    assert page.status_code == 200
    assert re.search(r'id="stat-requests">2<', page.text)
    assert "50.00%" in page.text  # one error in two requests
    data = orjson.loads(re.search(r'id="chart-data">(.*?)</script>', page.text, re.S).group(1))  # type: ignore[union-attr]
    charts = {c["id"]: c for c in data["charts"]}
    assert set(charts) == {"requests", "revenue", "spend", "active_keys", "error_rate",
                           "latency_models", "latency_providers"}  # fmt: skip
    assert sum(int(v) for v in charts["requests"]["series"][0]["values"]) == 2
    assert "12.50" in charts["revenue"]["series"][0]["values"]
    assert max(int(v) for v in charts["active_keys"]["series"][0]["values"]) == 1
    assert charts["latency_models"]["x"] == ["fast-chat"]
    assert charts["latency_providers"]["x"] == ["local"]
    for r in ("7d", "30d", "90d"):
        assert (await admin.get("/admin/", params={"range": r})).status_code == 200
    today = datetime.now(UTC).date().isoformat()
    custom = await admin.get("/admin/", params={"start": today, "end": today})
    assert custom.status_code == 200 and re.search(r'id="stat-requests">2<', custom.text)


def test_windows_align_to_buckets():
    now = datetime(2026, 3, 10, 14, 25, tzinfo=UTC)
    day = window_for("24h", now)
    assert day.table == "usage_hourly" and len(day.buckets()) == 24
    assert day.end == datetime(2026, 3, 10, 15, tzinfo=UTC)
    month = window_for("30d", now)
    assert month.table == "usage_daily" and len(month.buckets()) == 30
    assert (
        month.end == datetime(2026, 3, 11, tzinfo=UTC) and month.keys_table == "active_keys_daily"
    )
    custom = window_for(None, now, now.date() - timedelta(days=2), now.date())
    assert custom.bucket_s == 3600 and len(custom.buckets()) == 72
    assert window_for("nonsense", now).key == "7d"


@pytest.fixture
async def store(clickhouse_url: str, clickhouse_database: str):
    s = ClickHouseStore(clickhouse_url, clickhouse_database)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


def event(i: int, key: str, ts_ms: int, status: int = 200) -> dict:
    return {"generation_id": f"gen-{i}", "key_hash": key * 64, "model": f"m{i % 2}",
            "provider": "p", "input_tokens": 10 + i, "output_tokens": 5, "cost_usd": "0.000123",
            "upstream_cost_usd": "0.0001", "latency_ms": 100 + i, "status": status, "ts": ts_ms}  # fmt: skip


async def test_rollups_are_exact_and_count_each_event_once(store: ClickHouseStore):
    now_ms = int(time.time() * 1000)
    events = [event(i, "a" if i % 3 else "b", now_ms - i * 60_000, 502 if i == 4 else 200)
              for i in range(30)]  # fmt: skip
    assert await store.insert_new_events(events) == 30
    # Redelivered (a meter crash before its ack): nothing new is inserted or rolled up.
    assert await store.insert_new_events(events[:10]) == 0
    w = window_for("24h", datetime.now(UTC))
    params = {"table": w.table, "start": w.start.replace(tzinfo=None),
              "end": w.end.replace(tzinfo=None), "bucket_s": w.bucket_s}  # fmt: skip
    totals = (await store.query(Q.admin_ch_overview_totals, params))[0]
    assert totals["requests"] == 30 and totals["errors"] == 1
    assert totals["cost_usd"] == Decimal("0.000123") * 30
    assert totals["input_tokens"] == sum(10 + i for i in range(30))
    daily = (await store.query(Q.admin_ch_overview_totals, {**params, "table": "usage_daily",
             "start": w.start.replace(hour=0, tzinfo=None) - timedelta(days=1)}))[0]  # fmt: skip
    assert daily["requests"] == 30
    keys = (await store.query(Q.admin_ch_active_keys_total, {**params, "table": w.keys_table}))[0]
    assert keys["active_keys"] == 2
    today = datetime.now(UTC).date()
    per_key = await store.query(RQ.ch_key_usage_daily, {
        "key_hashes": ["b" * 64], "start": today - timedelta(days=1), "end": today})  # fmt: skip
    assert sum(r["requests"] for r in per_key) == 10
    assert sum(r["cost_usd"] for r in per_key) == Decimal("0.000123") * 10
    recent = await store.query(RQ.ch_key_generations, {"key_hashes": ["b" * 64], "limit": 3})
    assert [r["generation_id"] for r in recent] == ["gen-0", "gen-3", "gen-6"]


async def test_overview_splits_requests_by_protocol(admin: AdminClient):
    stack = admin.stack
    key = await stack.create_key("3.00")
    await chat(stack, key)
    auth = {"Authorization": f"Bearer {key}"}
    async with stack.client() as c:
        r = await c.post("/v1/responses", json={"model": "fast-chat", "input": "hi"}, headers=auth)
        assert r.status_code == 200
        for _ in range(2):
            r = await c.post(
                "/v1/messages",
                headers=auth,
                json={"model": "fast-chat", "max_tokens": 20,
                      "messages": [{"role": "user", "content": "hi"}]},
            )  # fmt: skip
            assert r.status_code == 200
    await wait_generations(stack, key, 4)
    page = await admin.get("/admin/", params={"range": "24h"})
    table = page.text[page.text.index("<h2>Per protocol</h2>") :]
    rows = dict(re.findall(r'<tr><td>(\w+)</td><td class="num">(\d+)</td>', table))
    assert rows == {"messages": "2", "chat": "1", "responses": "1"}
