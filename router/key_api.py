"""GET /v1/key: the calling key's balance and spend, as exact decimal strings. A sub-key sees
only itself: its caps and spend, never its parent's balance; a disabled or expired one gets
401, as its requests do."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.auth import key_summary, refuse_inactive_sub_key
from apifast.db import Queries
from apifast.money import format_usd
from apifast.router.state import RouterState
from apifast.router.subkeys import sub_key_json

Q = Queries("apifast.router")

api = APIRouter(tags=["key"])


@api.get("/v1/key")
async def get_key(request: Request) -> Response:
    state: RouterState = request.app.state.apifast
    _, row = await key_summary(request, state.pool, state.secret)
    if row["parent_id"] is not None:
        refuse_inactive_sub_key(row)
        own = await state.pool.fetchrow(Q.subkey_self, row["id"])
        return Response(orjson.dumps(sub_key_json(own, with_label=False)),
                        media_type="application/json")  # fmt: skip
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
