"""GET /v1/key: the calling key's balance and spend, as exact decimal strings."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.db import Queries
from apifast.money import format_usd
from router.auth import key_hash_from_request
from router.errors import ApiError
from router.state import RouterState

api = APIRouter(tags=["key"])
Q = Queries()


async def key_row(request: Request) -> tuple[RouterState, bytes, dict]:  # type: ignore[type-arg]
    state: RouterState = request.app.state.apifast
    key_hash = key_hash_from_request(request, state.secret)
    row = await state.pool.fetchrow(Q.key_summary, key_hash)
    if row is None:
        raise ApiError(401, "Invalid API key.", code="invalid_api_key")
    return state, key_hash, dict(row)


@api.get("/v1/key")
async def get_key(request: Request) -> Response:
    _, _, row = await key_row(request)
    body = {
        "balance_usd": format_usd(row["balance_usd"]),
        "reserved_usd": format_usd(row["reserved_usd"]),
        "available_usd": format_usd(row["balance_usd"] - row["reserved_usd"]),
        "spent_usd": format_usd(row["spent_usd"]),
        "created_at": row["created_at"].isoformat(),
        "rpm_limit": row["rpm_limit"],
        "tpm_limit": row["tpm_limit"],
        "disabled": row["disabled"],
    }
    return Response(orjson.dumps(body), media_type="application/json")
