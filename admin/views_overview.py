"""/admin/: the overview charts over a chosen range, and the audit trail."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from fastapi import APIRouter, Depends
from starlette.responses import Response

from apifast.admin.analytics import RANGES, bucket_labels, credit_figures, usage_figures, window_for
from apifast.admin.web import Ctx, admin_ctx, render
from apifast.db import Queries
from apifast.money import format_usd

router = APIRouter()
Q = Queries("apifast.admin")


def _day(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


def _charts(labels: list[str], usage: dict[str, Any] | None, credit: dict[str, Any]) -> list:  # type: ignore[type-arg]
    charts: list[dict[str, Any]] = [
        {"id": "revenue", "title": "Credit sold (USD)", "unit": "usd", "x": labels,
         "series": [{"name": "sold", "values": credit["revenue"]},
                    {"name": "granted by hand", "values": credit["manual"]}]},
    ]  # fmt: skip
    if usage is None:
        return charts
    s = usage["series"]
    charts = [
        {"id": "requests", "title": "Requests", "unit": "count", "x": labels,
         "series": [{"name": "requests", "values": s["requests"]},
                    {"name": "errors", "values": s["errors"]}]},
        *charts,
        {"id": "spend", "title": "Spend: price charged vs upstream cost (USD)", "unit": "usd",
         "x": labels,
         "series": [{"name": "charged", "values": s["spend"]},
                    {"name": "upstream cost", "values": s["upstream_cost"]}]},
        {"id": "active_keys", "title": "Active keys", "unit": "count", "x": labels,
         "series": [{"name": "keys", "values": s["active_keys"]}]},
        {"id": "error_rate", "title": "Error rate (%)", "unit": "pct", "x": labels,
         "series": [{"name": "errors", "values": s["error_rate"]}]},
    ]  # fmt: skip
    for dim in ("models", "providers"):
        rows = usage[dim]
        charts.append(
            {"id": f"latency_{dim}", "title": f"Latency per {dim[:-1]} (ms)", "unit": "ms",
             "kind": "bar", "x": [r["name"] for r in rows],
             "series": [{"name": "p50", "values": [r["p50_ms"] for r in rows]},
                        {"name": "p95", "values": [r["p95_ms"] for r in rows]}]}
        )  # fmt: skip
    return charts


@router.get("/admin/")
async def overview(
    range: str = "7d",
    start: str | None = None,
    end: str | None = None,
    ctx: Ctx = Depends(admin_ctx),
) -> Response:
    w = window_for(range, datetime.now(UTC), _day(start), _day(end))
    credit = await credit_figures(ctx.pool, w)
    usage = None
    if ctx.state.clickhouse is not None:
        usage = await usage_figures(ctx.state.clickhouse, w)
    labels = bucket_labels(w)
    over = await ctx.pool.fetchrow(Q.admin_overages, w.start, w.end)
    overages = {"requests": over["requests"], "usd": format_usd(over["overage_usd"])}
    sessions = await ctx.pool.fetchval(
        Q.admin_sessions_count, ctx.state.settings.admin_session_idle_s
    )
    health = ctx.state.route_health
    return render(
        ctx.request, "overview.html", ctx=ctx, window=w, ranges=RANGES, usage=usage,
        credit=credit, charts={"charts": _charts(labels, usage, credit)}, sessions=sessions,
        overages=overages, routes=health() if health is not None else None,
    )  # fmt: skip


@router.get("/admin/audit")
async def audit_log(
    before: int | None = None, action: str | None = None, ctx: Ctx = Depends(admin_ctx)
) -> Response:
    limit = 100
    rows = await ctx.pool.fetch(Q.admin_audit_list, before, action or None, limit)
    older = rows[-1]["id"] if len(rows) == limit else None
    return render(ctx.request, "audit.html", ctx=ctx, rows=rows, older=older, action=action or "")
