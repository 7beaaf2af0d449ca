"""GET /v1/generations?limit=N: the calling key's most recent requests, newest first, from
ClickHouse (what the key holder's dashboard lists). Counts, cost and timing only."""

from __future__ import annotations

from datetime import UTC
from decimal import Decimal
from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.db import Queries
from apifast.money import format_usd
from router.auth import key_hash_from_request
from router.errors import ApiError
from router.state import RouterState

api = APIRouter(tags=["usage"])
Q = Queries()
MAX_LIMIT = 100


def _item(r: dict[str, Any]) -> dict[str, Any]:
    ts = r["ts"].replace(tzinfo=UTC)
    return {
        "id": r["generation_id"],
        "object": "generation",
        "model": r["model"],
        "endpoint": r["endpoint"],
        "stream": bool(r["stream"]),
        "input_tokens": int(r["input_tokens"]),
        "output_tokens": int(r["output_tokens"]),
        "cached_tokens": int(r["cached_tokens"]),
        "reasoning_tokens": int(r["reasoning_tokens"]),
        "cost_usd": format_usd(Decimal(r["cost_usd"])),
        "latency_ms": int(r["latency_ms"]),
        "ttft_ms": int(r["ttft_ms"]),
        "status": int(r["status"]),
        "outcome": r["outcome"],
        "created": int(ts.timestamp()),
        "created_at": ts.isoformat(),
    }


@api.get("/v1/generations")
async def generations(request: Request, limit: int = 20) -> Response:
    state: RouterState = request.app.state.apifast
    key_hash = key_hash_from_request(request, state.secret)
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, f"limit: must be between 1 and {MAX_LIMIT}", param="limit",
                       code="invalid_value")  # fmt: skip
    if state.clickhouse is None:
        raise ApiError(503, "Usage analytics are not configured on this server.",
                       code="analytics_unavailable")  # fmt: skip
    rows = await state.clickhouse.query(
        Q.admin_ch_key_generations, {"key_hash": key_hash.hex(), "limit": limit}
    )
    body = {"object": "list", "data": [_item(r) for r in rows], "has_more": len(rows) == limit}
    return Response(orjson.dumps(body), media_type="application/json")
