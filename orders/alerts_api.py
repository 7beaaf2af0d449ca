"""POST/GET/DELETE /v1/key/alerts: a low-balance alert for a key holder who left an email
(orders/balance_alerts.py sends it). The address on file is stored only as a hash, so the
holder gives it again once, in `email`; it must be the one on file, and is then kept
encrypted for the alerts. A sub-key cannot set alerts (403)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.auth import holder_summary
from apifast.db import Queries
from apifast.errors import ApiError, bad
from apifast.money import NO_FRACTION, MoneyError, format_usd, parse_usd
from apifast.orders.balance_alerts import alert_aad
from apifast.orders.email_keys import email_hash, normalize_email
from apifast.orders.orders_api import parse_body
from apifast.orders.runtime import PaymentsRuntime, runtime
from apifast.request_body import read_body

api = APIRouter(tags=["alerts"])
Q = Queries("apifast.orders")


def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _view(row: Any) -> dict[str, Any]:
    if row is None:
        return {"object": "balance_alert", "low_balance_usd": None}
    return {
        "object": "balance_alert",
        "low_balance_usd": format_usd(row["threshold_usd"]),
        "armed": row["armed"],
        "last_sent_at": row["sent_at"].isoformat() if row["sent_at"] else None,
    }


async def _holder(request: Request) -> tuple[PaymentsRuntime, dict[str, Any]]:
    rt = runtime(request)
    _, key = await holder_summary(request, rt.core.pool, rt.core.secret)
    if key["disabled"]:
        raise ApiError(401, "This API key has been disabled.", code="key_disabled")
    return rt, key


@api.post("/v1/key/alerts")
async def set_alert(request: Request) -> Response:
    rt, key = await _holder(request)
    body = parse_body(await read_body(request, 4096, rt.settings.body_read_timeout_s))
    value = body.get("low_balance_usd")
    if value is None:
        raise bad("low_balance_usd", 'required: send a decimal string like "5.00"')
    if isinstance(value, Decimal):
        # parse_body read a number with a fraction, exactly; refused all the same, so that one
        # rule holds for the key holder's money fields (sub-key caps too): a string or an int.
        raise bad("low_balance_usd", NO_FRACTION)
    try:
        threshold = parse_usd(value, field="low_balance_usd")
    except MoneyError as exc:
        raise bad("low_balance_usd", str(exc).removeprefix("low_balance_usd ")) from None
    if threshold <= 0:
        raise bad("low_balance_usd", "must be above 0")
    if not rt.mailer.configured:
        raise ApiError(400, "This server sends no email, so it cannot send alerts.",
                       code="email_unavailable")  # fmt: skip
    pool = rt.core.pool
    on_file = await pool.fetchval(Q.email_key_get, key["id"])
    if on_file is None:
        raise ApiError(400, "No email is on file for this key: alerts go only to the address "
                       "left with an order.", param="email", code="no_email_on_file")  # fmt: skip
    given = body.get("email")
    if given is None:
        # Only the threshold changes: an alert must already hold the address.
        if await pool.fetchval(Q.balance_alert_threshold, key["id"], threshold) is None:
            raise bad("email", "required the first time: the address left with your order")
    else:
        email = normalize_email(given)
        if email is None or email_hash(rt.core.secret, email) != bytes(on_file):
            raise bad("email", "not the address on file for this key")
        sealed = rt.keyring.encrypt(email.encode(), alert_aad(key["id"]))
        await pool.execute(Q.balance_alert_upsert, key["id"], threshold, sealed.ciphertext,
                           sealed.nonce, sealed.kid)  # fmt: skip
    return _json(_view(await pool.fetchrow(Q.balance_alert_get, key["id"])))


@api.get("/v1/key/alerts")
async def get_alert(request: Request) -> Response:
    rt, key = await _holder(request)
    return _json(_view(await rt.core.pool.fetchrow(Q.balance_alert_get, key["id"])))


@api.delete("/v1/key/alerts")
async def delete_alert(request: Request) -> Response:
    rt, key = await _holder(request)
    result = await rt.core.pool.execute(Q.balance_alert_delete, key["id"])
    return _json({"object": "balance_alert", "low_balance_usd": None,
                  "deleted": result.endswith(" 1")})  # fmt: skip
