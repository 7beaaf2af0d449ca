"""/admin/keys: find a key by its prefix, see its balance and ledger, credit or debit it by
hand with a reason, disable or enable it. /admin/orders: orders and their status history."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, date, datetime, timedelta
from urllib.parse import quote

from fastapi import APIRouter, Depends
from starlette.responses import Response

from apifast.admin.balance_adjust import adjust_balance, refusal
from apifast.admin.web import Ctx, admin_ctx, audit, field, form_with_csrf, redirect, render
from apifast.db import Queries
from apifast.keys import PREFIX, hash_key, is_well_formed
from apifast.money import MoneyError, parse_usd

router = APIRouter()
Q = Queries("apifast.admin")
PREFIX_LEN = len(PREFIX) + 8  # what api_keys.prefix holds (apifast.keys.key_prefix)
MAX_ADJUST_USD = 1_000_000
AMOUNT = re.compile(r"^\d{1,7}(\.\d{1,12})?$")


def _like_prefix(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


@router.get("/admin/keys")
async def keys_page(q: str = "", ctx: Ctx = Depends(admin_ctx)) -> Response:
    """Keys whose prefix starts with `q` (a whole key is looked up by POST, never by URL)."""
    q = q.strip()[:PREFIX_LEN]
    rows = await ctx.pool.fetch(Q.admin_keys_find, _like_prefix(q), 50)
    return render(ctx.request, "keys.html", ctx=ctx, rows=rows, q=q)


@router.post("/admin/keys/find")
async def find_key(ctx: Ctx = Depends(admin_ctx)) -> Response:
    """Find by a pasted key or prefix. Posted, so that a whole key stays out of URLs and
    browser history; a whole key is only hashed, like a request's."""
    form = await form_with_csrf(ctx)
    q = field(form, "q", limit=200)
    if is_well_formed(q):
        key_id = await ctx.pool.fetchval(Q.admin_key_by_hash, hash_key(ctx.state.secret, q))
        if key_id is not None:
            return redirect(f"/admin/keys/{key_id}")
        return render(ctx.request, "keys.html", status=404, ctx=ctx, rows=[], q="")
    return redirect("/admin/keys?q=" + quote(q[:PREFIX_LEN], safe=""))


async def _key_page(ctx: Ctx, key_id: int, *, error: str = "", status: int = 200,
                    done: str = "") -> Response:  # fmt: skip
    key = await ctx.pool.fetchrow(Q.admin_key_get, key_id)
    if key is None:
        return render(ctx.request, "error.html", status=404, title="Not found",
                      message="No such key.")  # fmt: skip
    ledger = await ctx.pool.fetch(Q.admin_key_ledger, key_id, 200)
    return render(ctx.request, "key.html", status=status, ctx=ctx, key=key, ledger=ledger,
                  error=error, done=done)  # fmt: skip


@router.get("/admin/keys/{key_id}")
async def key_page(key_id: int, done: str = "", ctx: Ctx = Depends(admin_ctx)) -> Response:
    return await _key_page(ctx, key_id, done=done)


@router.post("/admin/keys/{key_id}/adjust")
async def adjust(key_id: int, ctx: Ctx = Depends(admin_ctx)) -> Response:
    form = await form_with_csrf(ctx)
    direction = field(form, "direction")
    reason = field(form, "reason", limit=500)
    try:
        raw = field(form, "amount", limit=40)
        if not AMOUNT.match(raw):
            raise MoneyError("amount must be a plain decimal such as 5.00")
        amount = parse_usd(raw, field="amount")
        if amount <= 0 or amount > MAX_ADJUST_USD:
            raise MoneyError(f"amount must be above 0 and at most {MAX_ADJUST_USD}")
        if direction not in ("credit", "debit"):
            raise MoneyError("choose credit or debit")
        if not reason:
            raise MoneyError("a reason is required")
    except MoneyError as exc:
        return await _key_page(ctx, key_id, error=str(exc), status=400)
    signed = amount if direction == "credit" else -amount
    kind = f"admin_{direction}"
    ref = f"admin:{secrets.token_hex(8)}"
    result = await adjust_balance(ctx.pool, key_id, kind, ref, signed, reason)
    if result is None or not result.done:
        status = 404 if result is None else 409
        return await _key_page(ctx, key_id, status=status, error=refusal(amount, result))
    await audit(ctx.pool, ctx.session.id, kind, f"key {key_id}", amount_usd=str(signed),
                reason=reason, ledger_ref=ref, balance_usd=str(result.balance))  # fmt: skip
    return redirect(f"/admin/keys/{key_id}?done={direction}")


@router.post("/admin/keys/{key_id}/disable")
async def disable(key_id: int, ctx: Ctx = Depends(admin_ctx)) -> Response:
    form = await form_with_csrf(ctx)
    disabled = field(form, "disabled") == "1"
    if await ctx.pool.fetchval(Q.admin_key_set_disabled, key_id, disabled) is not None:
        await audit(ctx.pool, ctx.session.id, "key_disabled" if disabled else "key_enabled",
                    f"key {key_id}")  # fmt: skip
    return redirect(f"/admin/keys/{key_id}?done={'disabled' if disabled else 'enabled'}")


def _day(value: str) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


@router.get("/admin/orders")
async def orders_page(status: str = "", start: str = "", end: str = "",
                      ctx: Ctx = Depends(admin_ctx)) -> Response:  # fmt: skip
    today = datetime.now(UTC).date()
    end_day = _day(end) or today
    start_day = _day(start) or end_day - timedelta(days=30)
    begin = datetime.combine(start_day, datetime.min.time(), UTC)
    stop = datetime.combine(end_day + timedelta(days=1), datetime.min.time(), UTC)
    limit = 200
    orders = await ctx.pool.fetch(Q.admin_orders_list, status or None, begin, stop, limit)
    events = await ctx.pool.fetch(Q.admin_order_events, [o["id"] for o in orders])
    history: dict[str, list] = {}  # type: ignore[type-arg]
    for e in events:
        history.setdefault(e["order_id"], []).append(e)
    statuses = [r["status"] for r in await ctx.pool.fetch(Q.admin_order_statuses)]
    return render(
        ctx.request, "orders.html", ctx=ctx, orders=orders, history=history, statuses=statuses,
        status_filter=status, start=start_day.isoformat(), end=end_day.isoformat(),
        truncated=len(orders) == limit,
    )  # fmt: skip
