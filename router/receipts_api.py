"""Receipts for the key holder: the public keys that verify them, and all of a key's
receipts for a date range as JSON lines (GET /v1/receipts?from=YYYY-MM-DD&to=YYYY-MM-DD)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from apifast.auth import key_hash_from_request
from apifast.errors import ApiError, bad
from apifast.receipts import ReceiptSigner
from apifast.router.state import RouterState
from apifast.router.usage_api import row_receipt

api = APIRouter(tags=["receipts"])

_MAX_DAYS = 366
_RECEIPTS_SQL = """
SELECT generation_id, model, api, input_tokens, output_tokens, cached_tokens, cost_usd, ts
FROM usage_events
WHERE key_hash = {key_hash:String} AND ts >= {start:DateTime64(3, 'UTC')}
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


def _day(value: str | None, name: str) -> date:
    if not value:
        raise bad(name, "required: a date, YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise bad(name, "must be a date, YYYY-MM-DD") from None


@api.get("/v1/receipts")
async def receipts(request: Request) -> Response:
    """Every priced request of the calling key from `from` to `to` (both included, UTC days),
    one signed receipt per line, oldest first."""
    state: RouterState = request.app.state.apifast
    key_hash = key_hash_from_request(request, state.secret)
    signer = _signer(state)
    first = _day(request.query_params.get("from"), "from")
    last = _day(request.query_params.get("to"), "to")
    if last < first:
        raise bad("to", "must not be before from")
    if (last - first).days >= _MAX_DAYS:
        raise bad("to", f"a range is at most {_MAX_DAYS} days")
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
                {"key_hash": key_hash.hex(), "start": start, "end": start + timedelta(days=1)},
            )
            for row in rows:
                receipt = signer.sign(row_receipt(row, key_hash))
                yield orjson.dumps({"id": row["generation_id"], "receipt": receipt}) + b"\n"
            day += timedelta(days=1)

    return StreamingResponse(lines(), media_type="application/x-ndjson")
