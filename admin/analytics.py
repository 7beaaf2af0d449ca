"""The overview's figures: usage from the ClickHouse rollups, credit sold from the Postgres
ledger, bucketed over a chosen range. Money stays Decimal; charts get decimal strings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from apifast.db import Queries
from apifast.money import ZERO, format_usd

if TYPE_CHECKING:
    from apifast.admin.state import UsageStore

Q = Queries("apifast.admin")

HOUR = 3600
DAY = 86400
# Range presets: (label, length, bucket). Up to a week reads hourly rollups; beyond, daily.
RANGES: dict[str, tuple[str, int, int]] = {
    "24h": ("Last 24 hours", 24 * HOUR, HOUR),
    "7d": ("Last 7 days", 7 * DAY, HOUR),
    "30d": ("Last 30 days", 30 * DAY, DAY),
    "90d": ("Last 90 days", 90 * DAY, DAY),
}
DEFAULT_RANGE = "7d"
MAX_CUSTOM_DAYS = 400


@dataclass(frozen=True, slots=True)
class Window:
    key: str
    label: str
    start: datetime  # inclusive, aligned to the bucket
    end: datetime  # exclusive
    bucket_s: int

    @property
    def table(self) -> str:
        return "usage_hourly" if self.bucket_s == HOUR else "usage_daily"

    @property
    def keys_table(self) -> str:
        return "active_keys_hourly" if self.bucket_s == HOUR else "active_keys_daily"

    @property
    def trunc(self) -> str:
        return "hour" if self.bucket_s == HOUR else "day"

    @property
    def last_day(self) -> date:
        return (self.end - timedelta(microseconds=1)).date()

    def buckets(self) -> list[datetime]:
        step = timedelta(seconds=self.bucket_s)
        out, t = [], self.start
        while t < self.end:
            out.append(t)
            t += step
        return out


def window_for(key: str | None, now: datetime, start: date | None = None,
               end: date | None = None) -> Window:  # fmt: skip
    """A preset range ending with the current bucket, or whole UTC days from start to end."""
    if start is not None and end is not None and start <= end:
        end = min(end, start + timedelta(days=MAX_CUSTOM_DAYS))
        days = (end - start).days + 1
        bucket = HOUR if days <= 7 else DAY
        begin = datetime.combine(start, datetime.min.time(), UTC)
        label = f"{start.isoformat()} to {end.isoformat()}"
        return Window("custom", label, begin, begin + timedelta(days=days), bucket)
    key = key if key in RANGES else DEFAULT_RANGE
    label, length, bucket = RANGES[key]
    epoch = int(now.timestamp())
    end_ts = epoch - epoch % bucket + bucket
    stop = datetime.fromtimestamp(end_ts, UTC)
    return Window(key, label, stop - timedelta(seconds=length), stop, bucket)


def _naive(t: datetime) -> datetime:
    # clickhouse-connect returns UTC DateTimes without tzinfo.
    return t.astimezone(UTC).replace(tzinfo=None)


def _pct(part: int, whole: int) -> str:
    return f"{Decimal(part * 100) / Decimal(whole):.2f}" if whole else "0.00"


def _usd(value: Any) -> str:
    return format_usd(Decimal(value or 0))


def route_split(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and route index: requests, their share of the model's, errors, retried."""
    totals: dict[str, int] = {}
    for r in rows:
        totals[r["model"]] = totals.get(r["model"], 0) + int(r["requests"])
    return [
        {
            "model": r["model"], "index": int(r["route_index"]), "provider": r["provider"],
            "requests": int(r["requests"]), "errors": int(r["errors"]),
            "retried": int(r["retried"]),
            "share": _pct(int(r["requests"]), totals[r["model"]]),
        }
        for r in rows
    ]  # fmt: skip


async def usage_figures(clickhouse: UsageStore, w: Window) -> dict[str, Any]:
    params = {"table": w.table, "start": _naive(w.start), "end": _naive(w.end),
              "bucket_s": w.bucket_s}  # fmt: skip
    series = await clickhouse.query(Q.admin_ch_overview_series, params)
    totals = (await clickhouse.query(Q.admin_ch_overview_totals, params) or [{}])[0]
    per_model = await clickhouse.query(Q.admin_ch_latency_by_model, params)
    per_provider = await clickhouse.query(Q.admin_ch_latency_by_provider, params)
    per_api = await clickhouse.query(Q.admin_ch_by_api, params)
    split = await clickhouse.query(Q.admin_ch_route_split, params)
    params["table"] = w.keys_table
    keys_series = await clickhouse.query(Q.admin_ch_active_keys_series, params)
    keys_total = (await clickhouse.query(Q.admin_ch_active_keys_total, params) or [{}])[0]
    by_bucket = {_naive(r["bucket"]): r for r in series}
    keys_by_bucket = {_naive(r["bucket"]): int(r["active_keys"]) for r in keys_series}
    points = [by_bucket.get(_naive(b), {}) for b in w.buckets()]
    requests = int(totals.get("requests") or 0)
    errors = int(totals.get("errors") or 0)
    spend = Decimal(totals.get("cost_usd") or 0)
    upstream = Decimal(totals.get("upstream_cost_usd") or 0)
    return {
        "totals": {
            "requests": requests,
            "errors": errors,
            "error_rate": _pct(errors, requests),
            "active_keys": int(keys_total.get("active_keys") or 0),
            "spend": format_usd(spend),
            "upstream_cost": format_usd(upstream),
            "margin": format_usd(spend - upstream)
            if spend >= upstream
            else "-" + format_usd(upstream - spend),
        },
        "series": {
            "requests": [str(int(p.get("requests") or 0)) for p in points],
            "errors": [str(int(p.get("errors") or 0)) for p in points],
            "error_rate": [
                _pct(int(p.get("errors") or 0), int(p.get("requests") or 0)) for p in points
            ],
            "spend": [_usd(p.get("cost_usd")) for p in points],
            "upstream_cost": [_usd(p.get("upstream_cost_usd")) for p in points],
            "active_keys": [str(keys_by_bucket.get(_naive(b), 0)) for b in w.buckets()],
        },
        "route_split": route_split(split),
        "models": [_breakdown(r) for r in per_model],
        "providers": [_breakdown(r) for r in per_provider],
        "apis": [_breakdown(r) for r in per_api],
    }


def _breakdown(row: dict[str, Any]) -> dict[str, Any]:
    p50, p95 = (row.get("latency") or [0, 0])[:2]
    requests = int(row["requests"])
    spend = Decimal(row["cost_usd"] or 0)
    upstream = Decimal(row["upstream_cost_usd"] or 0)
    return {
        "name": row["name"] or "(none)",
        "requests": requests,
        "error_rate": _pct(int(row["errors"]), requests),
        "p50_ms": str(round(p50)),
        "p95_ms": str(round(p95)),
        "spend": format_usd(spend),
        "upstream_cost": format_usd(upstream),
        "margin": format_usd(spend - upstream)
        if spend >= upstream
        else "-" + format_usd(upstream - spend),
    }


async def credit_figures(pool: asyncpg.Pool, w: Window) -> dict[str, Any]:
    """Credit sold (ledger kind 'payment') and credit granted by hand, per bucket."""
    rows = await pool.fetch(Q.admin_credit_series, w.trunc, w.start, w.end)
    sold: dict[datetime, Decimal] = {}
    manual: dict[datetime, Decimal] = {}
    for r in rows:
        target = sold if r["kind"] == "payment" else manual
        bucket = r["bucket"].astimezone(UTC)
        target[bucket] = target.get(bucket, ZERO) + r["amount_usd"]
    buckets = w.buckets()
    return {
        "revenue_total": format_usd(sum(sold.values(), ZERO)),
        "manual_total": _signed(sum(manual.values(), ZERO)),
        "revenue": [format_usd(sold.get(b, ZERO)) for b in buckets],
        "manual": [_signed(manual.get(b, ZERO)) for b in buckets],
    }


def _signed(amount: Decimal) -> str:
    return format_usd(amount) if amount >= 0 else "-" + format_usd(-amount)


def bucket_labels(w: Window) -> list[str]:
    fmt = "%Y-%m-%d %H:00" if w.bucket_s == HOUR else "%Y-%m-%d"
    return [b.strftime(fmt) for b in w.buckets()]
