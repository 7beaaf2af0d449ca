"""GET /v1/generations?limit=N: the calling key's most recent requests, newest first, from
ClickHouse (what the key holder's dashboard lists), the keys it was rotated from included.
Counts, cost and timing only."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.auth import history_hashes
from apifast.db import Queries
from apifast.errors import ApiError
from apifast.router.state import RouterState
from apifast.router.usage_api import generation_json, hex_list

api = APIRouter(tags=["usage"])
Q = Queries("apifast.router")
MAX_LIMIT = 100


@api.get("/v1/generations")
async def generations(request: Request, limit: int = 20) -> Response:
    state: RouterState = request.app.state.apifast
    hashes = await history_hashes(request, state.pool, state.secret)
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, f"limit: must be between 1 and {MAX_LIMIT}", param="limit",
                       code="invalid_value")  # fmt: skip
    if state.clickhouse is None:
        raise ApiError(503, "Usage analytics are not configured on this server.",
                       code="analytics_unavailable")  # fmt: skip
    rows = await state.clickhouse.query(
        Q.ch_key_generations, {"key_hashes": hex_list(hashes), "limit": limit}
    )
    body = {
        "object": "list",
        "data": [generation_json(r) for r in rows],
        "has_more": len(rows) == limit,
    }
    return Response(orjson.dumps(body), media_type="application/json")
