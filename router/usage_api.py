"""GET /v1/usage and GET /v1/generation/{id}: read from ClickHouse, only the caller's rows:
those of its key and of the keys it was rotated from (`history_hashes`)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.auth import history_hashes
from apifast.db import Queries
from apifast.errors import ApiError
from apifast.money import format_usd, json_number
from apifast.receipts import receipt_fields
from apifast.router.state import RouterState
from apifast.router.usage_dates import days_before, parse_day

api = APIRouter(tags=["usage"])
Q = Queries("apifast.router")

_MAX_RANGE_DAYS = 366

_GENERATION_SQL = """
SELECT generation_id, key_hash, model, endpoint, stream, input_tokens, output_tokens, cached_tokens,
       cache_write_tokens, reasoning_tokens, usage_estimated, cost_usd, latency_ms, ttft_ms,
       status, outcome, ts, api
FROM usage_events FINAL
WHERE key_hash IN {key_hashes:Array(String)} AND generation_id = {generation_id:String}
LIMIT 1
"""


def _store(state: RouterState) -> Any:
    if state.clickhouse is None:
        raise ApiError(503, "Usage analytics are not configured on this server.",
                       code="analytics_unavailable")  # fmt: skip
    return state.clickhouse


def _parse_day(value: str | None, name: str, default: date) -> date:
    return default if value is None or value == "" else parse_day(value, name)


@api.get("/v1/usage")
async def usage(request: Request, start: str | None = None, end: str | None = None) -> Response:
    """Usage per day and model between `start` and `end` (inclusive dates, UTC)."""
    state: RouterState = request.app.state.apifast
    hashes = await history_hashes(request, state.pool, state.secret)
    today = datetime.now(UTC).date()
    end_day = _parse_day(end, "end", today)
    start_day = _parse_day(start, "start", days_before(end_day, 29))
    if start_day > end_day:
        raise ApiError(400, "start: must not be after end", param="start", code="invalid_value")
    if (end_day - start_day).days >= _MAX_RANGE_DAYS:  # both days included
        raise ApiError(400, f"start: the range may span at most {_MAX_RANGE_DAYS} days",
                       param="start", code="invalid_value")  # fmt: skip
    # The per-key daily rollup (a materialized view) keeps this fast as events grow.
    rows = await _store(state).query(
        Q.ch_key_usage_daily,
        {"key_hashes": hex_list(hashes), "start": start_day, "end": end_day},
    )
    data = [
        {
            "date": r["day"].isoformat(),
            "model": r["model"],
            "requests": int(r["requests"]),
            "input_tokens": int(r["input_tokens"]),
            "output_tokens": int(r["output_tokens"]),
            "cached_tokens": int(r["cached_tokens"]),
            "reasoning_tokens": int(r["reasoning_tokens"]),
            "cost_usd": format_usd(Decimal(r["cost_usd"])),
        }
        for r in rows
    ]
    total = sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0))
    body = {
        "object": "list",
        "start": start_day.isoformat(),
        "end": end_day.isoformat(),
        "data": data,
        "total_cost_usd": format_usd(total),
        "total_requests": sum(d["requests"] for d in data),
    }
    return Response(orjson.dumps(body), media_type="application/json")


# The Messages and Responses APIs answer with their own prefix on the generation id
# (`msg_gen-...`, `resp_gen-...`): the id a client has is the one it may look up.
_PROTOCOL_PREFIXES = ("msg_", "resp_")


def stored_generation_id(answered_id: str) -> str:
    """The generation id as usage_events keeps it, from the `id` of any protocol's answer."""
    for prefix in _PROTOCOL_PREFIXES:
        rest = answered_id.removeprefix(prefix)
        if rest != answered_id and rest.startswith("gen-"):
            return rest
    return answered_id


@api.get("/v1/generation/{generation_id}")
async def generation(generation_id: str, request: Request) -> Response:
    state: RouterState = request.app.state.apifast
    hashes = await history_hashes(request, state.pool, state.secret)
    rows = await _store(state).query(
        _GENERATION_SQL,
        {"key_hashes": hex_list(hashes), "generation_id": stored_generation_id(generation_id)},
    )
    if not rows:
        shown = generation_id[:80]  # not the whole of what a client sent, echoed
        raise ApiError(404, f"No generation '{shown}' for this key (metering may take a "
                       "moment).", param="id", code="generation_not_found")  # fmt: skip
    body = generation_json(rows[0])
    if state.receipts is not None:
        body["receipt"] = state.receipts.sign(row_receipt(rows[0]))
    return Response(orjson.dumps(body), media_type="application/json")


def hex_list(hashes: list[bytes]) -> list[str]:
    """Key hashes as usage_events stores them (hex), for `key_hash IN {key_hashes:...}`."""
    return [h.hex() for h in hashes]


def row_receipt(r: dict[str, Any]) -> dict[str, Any]:
    """A receipt's fields from a usage_events row, the same as the router signed: with the
    hash of the key that made the request (a rotated-from key's, for older requests)."""
    stored = r["key_hash"]  # FixedString: bytes of the hex digits
    key_hash_hex = stored.decode("ascii") if isinstance(stored, bytes) else str(stored)
    ts = r["ts"] if r["ts"].tzinfo else r["ts"].replace(tzinfo=UTC)
    ts_ms = (ts - _EPOCH) // timedelta(milliseconds=1)
    return receipt_fields(
        generation_id=r["generation_id"], model=r["model"], api=r["api"],
        input_tokens=int(r["input_tokens"]), output_tokens=int(r["output_tokens"]),
        cached_tokens=int(r["cached_tokens"]), cost_usd=Decimal(r["cost_usd"]),
        ts_ms=ts_ms, key_hash_hex=key_hash_hex,
    )  # fmt: skip


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def generation_json(r: dict[str, Any]) -> dict[str, Any]:
    """One usage_events row as the API shows it; optional columns appear when selected."""
    ts = r["ts"] if r["ts"].tzinfo else r["ts"].replace(tzinfo=UTC)
    cost = Decimal(r["cost_usd"])
    out: dict[str, Any] = {
        "id": r["generation_id"],
        "object": "generation",
        "model": r["model"],
        "endpoint": r["endpoint"],
        "stream": bool(r["stream"]),
        "input_tokens": int(r["input_tokens"]),
        "output_tokens": int(r["output_tokens"]),
        "cached_tokens": int(r["cached_tokens"]),
        "reasoning_tokens": int(r["reasoning_tokens"]),
        "cost_usd": format_usd(cost),
        "cost": orjson.Fragment(json_number(cost).encode()),
        "latency_ms": int(r["latency_ms"]),
        "ttft_ms": int(r["ttft_ms"]),
        "status": int(r["status"]),
        "outcome": r["outcome"],
        "created": int(ts.timestamp()),
        "created_at": ts.astimezone(UTC).isoformat(),
    }
    if "cache_write_tokens" in r:
        out["cache_write_tokens"] = int(r["cache_write_tokens"])
    if "usage_estimated" in r:
        out["usage_estimated"] = bool(r["usage_estimated"])
    if "api" in r:  # the client protocol: chat, messages or responses (endpoint is the kind)
        out["api"] = r["api"]
    return out
