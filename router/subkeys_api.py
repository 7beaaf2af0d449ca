"""POST/GET /v1/keys, PATCH/DELETE /v1/keys/{id}: a key holder's sub-keys, authorised by the
holder's own key. A sub-key can call none of these (403): it never creates keys, sees its
siblings or reads its parent's data. A new sub-key's key is shown once, in the answer.

Not in the OpenAPI schema (like /v1/key/rotate): a fuzzer calling every operation would
disable and delete keys. Documented in the README."""

from __future__ import annotations

import secrets

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.auth import holder_summary
from apifast.db import Queries
from apifast.errors import ApiError
from apifast.keys import generate_key, hash_key, key_prefix
from apifast.request_body import parse_json_object, read_body
from apifast.router.state import RouterState
from apifast.router.subkeys import (
    MAX_SUB_KEYS,
    check_caps,
    parse_settings,
    sub_key_json,
)

api = APIRouter(tags=["keys"])
Q = Queries("apifast.router")
_MAX_BODY = 16 * 1024


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _not_found(sub_key_id: str) -> ApiError:
    return ApiError(
        404, f"No sub-key {sub_key_id[:40]!r} for this key.", param="id", code="sub_key_not_found"
    )


async def _holder(request: Request) -> tuple[RouterState, dict[str, object]]:
    state: RouterState = request.app.state.apifast
    _, row = await holder_summary(request, state.pool, state.secret)
    if row["disabled"]:
        raise ApiError(401, "This API key has been disabled.", code="key_disabled")
    return state, row


async def _body(request: Request, state: RouterState) -> dict[str, object]:
    raw = await read_body(request, _MAX_BODY, state.settings.body_read_timeout_s)
    return parse_json_object(raw)


@api.post("/v1/keys", status_code=201, include_in_schema=False)
async def create_sub_key(request: Request) -> Response:
    state, parent = await _holder(request)
    settings = parse_settings(await _body(request, state), state.catalog, allow_disabled=False)
    check_caps(settings, parent["balance_usd"])  # type: ignore[arg-type]
    key = generate_key()
    public_id = "sk_" + secrets.token_hex(12)
    async with state.pool.acquire() as conn, conn.transaction():
        # Counted under the parent's lock: concurrent creations cannot pass the cap together.
        await conn.execute(Q.subkey_lock_parent, parent["id"])
        if await conn.fetchval(Q.subkey_count, parent["id"]) >= MAX_SUB_KEYS:
            raise ApiError(400, f"A key can have at most {MAX_SUB_KEYS} sub-keys; delete some "
                           "first.", code="too_many_sub_keys")  # fmt: skip
        await conn.execute(
            Q.subkey_insert, parent["id"], hash_key(state.secret, key), key_prefix(key),
            public_id, settings.label, settings.spend_cap_usd, settings.daily_cap_usd,
            settings.rpm_limit, settings.expires_at, settings.allowed_models,
        )  # fmt: skip
    row = await state.pool.fetchrow(Q.subkeys_list, parent["id"], public_id)
    body = {
        **sub_key_json(row),
        "key": key,
        "message": "Store this key now: it is shown only once.",
    }
    return _json(body, 201)


@api.get("/v1/keys", include_in_schema=False)
async def list_sub_keys(request: Request) -> Response:
    state, parent = await _holder(request)
    rows = await state.pool.fetch(Q.subkeys_list, parent["id"], None)
    return _json({"object": "list", "data": [sub_key_json(r) for r in rows]})


@api.patch("/v1/keys/{sub_key_id}", include_in_schema=False)
async def update_sub_key(sub_key_id: str, request: Request) -> Response:
    state, parent = await _holder(request)
    s = parse_settings(await _body(request, state), state.catalog, allow_disabled=True)
    check_caps(s, parent["balance_usd"])  # type: ignore[arg-type]
    p = s.present
    found = await state.pool.fetchval(
        Q.subkey_update, parent["id"], sub_key_id,
        "disabled" in p, s.disabled, "label" in p, s.label,
        "spend_cap_usd" in p, s.spend_cap_usd, "daily_cap_usd" in p, s.daily_cap_usd,
        "rpm_limit" in p, s.rpm_limit, "expires_at" in p, s.expires_at,
        "allowed_models" in p, s.allowed_models,
    )  # fmt: skip
    if found is None:
        raise _not_found(sub_key_id)
    row = await state.pool.fetchrow(Q.subkeys_list, parent["id"], sub_key_id)
    return _json(sub_key_json(row))


@api.delete("/v1/keys/{sub_key_id}", include_in_schema=False)
async def delete_sub_key(sub_key_id: str, request: Request) -> Response:
    state, parent = await _holder(request)
    if await state.pool.fetchval(Q.subkey_delete, parent["id"], sub_key_id) is None:
        raise _not_found(sub_key_id)
    return _json({"id": sub_key_id, "object": "sub_key", "deleted": True})
