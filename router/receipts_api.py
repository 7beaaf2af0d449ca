"""Receipts for the key holder: the public keys that verify them, and all of a key's
receipts for a date range as JSON lines (GET /v1/receipts?start=YYYY-MM-DD&end=YYYY-MM-DD,
or `from`/`to`; the window defaults to /v1/usage's: the last 30 UTC days)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from apifast.auth import history_hashes
from apifast.errors import ApiError, bad
from apifast.receipts import ReceiptSigner
from apifast.router.state import RouterState
from apifast.router.usage_api import hex_list, row_receipt
from apifast.router.usage_dates import days_before, parse_day

api = APIRouter(tags=["receipts"])

_MAX_DAYS = 366
_DEFAULT_DAYS = 30  # GET /v1/usage's default window
_RECEIPTS_SQL = """
SELECT generation_id, key_hash, model, api, input_tokens, output_tokens, cached_tokens,
       cost_usd, ts
FROM usage_events
WHERE key_hash IN {key_hashes:Array(String)} AND ts >= {start:DateTime64(3, 'UTC')}
  AND ts < {end:DateTime64(3, 'UTC')} AND cost_usd > 0
ORDER BY ts, generation_id
LIMIT 1 BY generation_id
"""


def _signer(state: RouterState) -> ReceiptSigner:
    if state.receipts is None:
        raise ApiError(503, "Receipts are not configured on this server.",
                       code="receipts_unavailable")  # fmt: skip
    return state.receipts


@api.get("/.well-known/apifast-receipts.json")
async def receipt_keys(request: Request) -> Response:
    signer = _signer(request.app.state.apifast)
    return Response(orjson.dumps(signer.public_document()), media_type="application/json")


def _day(request: Request, name: str, alias: str) -> tuple[date | None, str]:
    """The day given as `name` or its `alias` (the same parameter under two names, as
    /v1/usage calls it and as this endpoint first did), and the name the client used."""
    given = {n: v for n in (name, alias) if (v := request.query_params.get(n))}
    if len(set(given.values())) > 1:
        raise bad(alias, f"{name} and {alias} are the same parameter; give one")
    if not given:
        return None, name
    used, value = next(iter(given.items()))
    return parse_day(value, used), used


@api.get("/v1/receipts")
async def receipts(request: Request) -> Response:
    """Every priced request of the calling key from `start` to `end` (both included, UTC
    days; also spelled `from` and `to`), one signed receipt per line, oldest first. Without
    them, the last 30 days up to today, as GET /v1/usage."""
    state: RouterState = request.app.state.apifast
    hashes = hex_list(await history_hashes(request, state.pool, state.secret))
    signer = _signer(state)
    last, end_name = _day(request, "end", "to")
    last = last or datetime.now(UTC).date()
    first, start_name = _day(request, "start", "from")
    first = first or days_before(last, _DEFAULT_DAYS - 1)
    if last < first:
        raise bad(end_name, f"must not be before {start_name}")
    if (last - first).days >= _MAX_DAYS:
        raise bad(end_name, f"a range is at most {_MAX_DAYS} days")
    store = state.clickhouse
    if store is None:
        raise ApiError(503, "Usage analytics are not configured on this server.",
                       code="analytics_unavailable")  # fmt: skip

    async def lines() -> AsyncIterator[bytes]:
        day = first
        while day <= last:  # a day at a time: a busy key's year never sits in memory whole
            start = datetime.combine(day, datetime.min.time(), UTC)
            rows = await store.query(
                _RECEIPTS_SQL,
                {"key_hashes": hashes, "start": start, "end": start + timedelta(days=1)},
            )
            for row in rows:
                receipt = signer.sign(row_receipt(row))
                yield orjson.dumps({"id": row["generation_id"], "receipt": receipt}) + b"\n"
            day += timedelta(days=1)

    return StreamingResponse(lines(), media_type="application/x-ndjson")
