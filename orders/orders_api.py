"""Buying credit: POST /v1/orders, GET /v1/orders[/{id}], GET /v1/payments/options.

Without `Authorization`, an order creates a new key (balance 0) and returns it once, as
`api_key`; with `Authorization: Bearer <key>` it tops that key up. Orders are readable only
with the key they credit.
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.auth import bearer_key, holder_summary, refuse_sub_key
from apifast.db import Queries
from apifast.errors import ApiError, bad
from apifast.keys import generate_key, hash_key, key_prefix
from apifast.money import MoneyError, format_usd, parse_usd
from apifast.orders.email_keys import email_hash, key_aad, normalize_email
from apifast.orders.mailer import Mail
from apifast.orders.runtime import PaymentsRuntime, runtime
from apifast.payments import CreatedPayment, PaymentError, PaymentOrder, PaymentProcessor
from apifast.request_body import read_body

api = APIRouter(tags=["orders"])
Q = Queries("apifast.orders")
CORE = Queries("apifast")
log = logging.getLogger("apifast.payments")

MAX_ORDER_BODY = 16 * 1024
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 200


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _plain(amount: Decimal | None) -> str | None:
    """A crypto amount as a plain decimal string, exactly as the processor gave it."""
    if amount is None:
        return None
    return format(amount.normalize(), "f") if amount else "0"


def order_json(row: Any, payments: list[Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "object": "order",
        "order_id": row["id"],
        "status": row["status"],
        "amount_usd": format_usd(row["amount_usd"]),
        "credited_usd": format_usd(row["credited_usd"]),
        "processor": row["processor"],
        "pay_currency": row["pay_currency"],
        "pay_address": row["pay_address"],
        "pay_amount": _plain(row["pay_amount"]),
        "pay_extra_id": row["pay_extra_id"],
        "payment_url": row["payment_url"],
        "expires_at": _iso(row["expires_at"]),
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "closed": row["closed_at"] is not None,
    }
    if payments is not None:
        body["payments"] = [
            {
                "payment_id": p["payment_id"],
                "parent_payment_id": p["parent_payment_id"],
                "status": p["status"],
                "credited_usd": format_usd(p["credited_usd"]),
                "updated_at": _iso(p["updated_at"]),
            }
            for p in payments
        ]
    return body


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object whose non-integer numbers are exact Decimals (amounts never float)."""
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _parse_amount(body: dict[str, Any], rt: PaymentsRuntime) -> Decimal:
    value = body.get("amount_usd")
    if value is None:
        raise bad("amount_usd", 'required: the credit to buy in USD, as a string such as "10.00"')
    try:
        amount = parse_usd(value, field="amount_usd", max_places=2)
    except MoneyError as exc:
        raise ApiError(400, str(exc), param="amount_usd", code="invalid_value") from None
    low, high = rt.settings.min_order_usd, rt.settings.max_order_usd
    if amount < low:
        raise bad("amount_usd", f"must be at least {format_usd(low)}")
    if amount > high:
        raise bad("amount_usd", f"must be at most {format_usd(high)}")
    return amount


def _pick_processor(body: dict[str, Any], rt: PaymentsRuntime) -> tuple[str, PaymentProcessor]:
    offered = sorted(rt.processors)
    name = body.get("processor")
    if name is None and len(offered) == 1:
        name = offered[0]
    if not offered:
        raise bad("processor", "no payment processor is configured on this server")
    if not isinstance(name, str) or rt.processor(name) is None:
        listed = ", ".join(offered)
        what = "required" if name is None else f"unknown processor {str(name)[:40]!r}"
        raise bad("processor", f"{what}; one of: {listed}")
    return name, rt.processors[name]


def _parse_currency(body: dict[str, Any], processor: PaymentProcessor) -> str | None:
    value = body.get("pay_currency")
    coins = ", ".join(processor.coins)
    if value is None:
        if processor.accepts(None):
            return None
        raise bad("pay_currency", f"required; one of: {coins}")
    if not isinstance(value, str) or not processor.accepts(value.strip().lower()):
        raise bad("pay_currency", f"unsupported currency; one of: {coins}")
    return value.strip().lower()


def _parse_email(body: dict[str, Any], rt: PaymentsRuntime) -> str | None:
    value = body.get("email")
    if value is None or value == "":
        return None
    email = normalize_email(value)
    if email is None:
        raise bad("email", "not a valid email address")
    if not rt.mailer.configured:
        raise bad("email", "email recovery is not available on this server")
    return email


def key_mail(email: str, keys: list[str], *, order_id: str | None = None) -> Mail:
    lines = ["Your ApiFast API key" + ("s" if len(keys) > 1 else "") + ":", ""]
    lines += [f"    {key}" for key in keys]
    lines += [""]
    if order_id:
        lines += [f"This mail was sent for order {order_id}.", ""]
    lines += [
        "Keep this mail safe: anyone holding a key can spend its balance.",
        "To stop keeping this address with your key: DELETE /v1/key/email with the key.",
    ]
    return Mail(to=email, subject="Your ApiFast API key", body="\n".join(lines) + "\n")


async def _min_for(processor: PaymentProcessor, coin: str | None) -> Decimal | None:
    if coin is None:
        return None
    for option in await processor.options():
        if option.coin == coin:
            return option.min_amount_usd
    return None


@api.post("/v1/orders", status_code=201)
async def create_order(request: Request) -> Response:
    rt = runtime(request)
    core = rt.core
    rt.order_limiter.enforce(request)
    body = parse_body(await read_body(request, MAX_ORDER_BODY, rt.settings.body_read_timeout_s))
    amount = _parse_amount(body, rt)
    name, processor = _pick_processor(body, rt)
    coin = _parse_currency(body, processor)
    email = _parse_email(body, rt)
    minimum = await _min_for(processor, coin)
    if minimum is not None and amount < minimum:
        raise bad("amount_usd", f"must be at least {format_usd(minimum)} for {coin}")

    existing_key: str | None = None
    key_id: int | None = None
    if request.headers.get("authorization"):
        existing_key = bearer_key(request)
        row = await core.pool.fetchrow(CORE.key_summary, hash_key(core.secret, existing_key))
        if row is None:
            raise ApiError(401, "Invalid API key.", code="invalid_api_key")
        refuse_sub_key(dict(row))  # a sub-key has no balance of its own to top up
        if row["disabled"]:
            # A rotated-away (or disabled) key cannot spend what it is paid: the payment
            # would sit on a dead key. Refused before any payment is made.
            raise ApiError(401, "This API key has been disabled; top up the key you use now.",
                           code="key_disabled")  # fmt: skip
        key_id = row["id"]

    order_id = "ord_" + secrets.token_hex(12)
    public_url = rt.settings.public_url.rstrip("/")
    try:
        created = await processor.create_payment(
            PaymentOrder(
                order_id=order_id,
                amount_usd=amount,
                pay_currency=coin,
                callback_url=f"{public_url}/v1/webhooks/{name}" if public_url else None,
            )
        )
    except PaymentError as exc:
        log.warning("%s could not create a payment: %s", name, exc)
        raise ApiError(
            502,
            "The payment processor could not create this payment. Try again, or another coin.",
            code="processor_error",
        ) from None

    new_key = generate_key() if existing_key is None else None
    key = existing_key or new_key
    assert key is not None
    async with core.pool.acquire() as conn, conn.transaction():
        if new_key is not None:
            key_id = (
                await conn.fetchrow(
                    CORE.create_key, hash_key(core.secret, new_key), key_prefix(new_key)
                )
            )["id"]
        assert key_id is not None
        row = await _insert_order(conn, order_id, key_id, amount, name, coin, created)
        if email is not None:
            hashed = email_hash(core.secret, email)
            sealed = rt.keyring.encrypt(key.encode(), key_aad(key_id, hashed))
            await conn.execute(
                Q.email_key_upsert, key_id, hashed, sealed.ciphertext, sealed.nonce, sealed.kid
            )
    if email is not None:
        rt.mailer.send(key_mail(email, [key], order_id=order_id))

    response = order_json(row)
    response["email_saved"] = email is not None
    if new_key is not None:
        response["api_key"] = new_key
    return _json(response, 201)


async def _insert_order(
    conn: Any,
    order_id: str,
    key_id: int,
    amount: Decimal,
    processor: str,
    coin: str | None,
    created: CreatedPayment,
) -> dict[str, Any]:
    status = created.status.value
    created_at = await conn.fetchval(
        Q.order_insert,
        order_id,
        key_id,
        amount,
        processor,
        created.pay_currency or coin,
        created.payment_id,
        created.invoice_id,
        created.pay_address,
        created.pay_amount,
        created.pay_extra_id,
        created.payment_url,
        created.expires_at,
        status,
    )
    await conn.execute(
        Q.order_event_insert, order_id, created.payment_id, status, None, 0, "created"
    )
    return {
        "id": order_id,
        "status": status,
        "amount_usd": amount,
        "credited_usd": Decimal(0),
        "processor": processor,
        "pay_currency": created.pay_currency or coin,
        "pay_address": created.pay_address,
        "pay_amount": created.pay_amount,
        "pay_extra_id": created.pay_extra_id,
        "payment_url": created.payment_url,
        "expires_at": created.expires_at,
        "created_at": created_at,
        "updated_at": created_at,
        "closed_at": None,
    }


@api.get("/v1/orders/{order_id}")
async def get_order(order_id: str, request: Request) -> Response:
    core = runtime(request).core
    _, key = await holder_summary(request, core.pool, core.secret)
    row = await core.pool.fetchrow(Q.order_for_key, order_id, key["id"])
    if row is None:
        raise ApiError(404, f"no order {order_id[:40]!r} for this key", code="order_not_found")
    payments = await core.pool.fetch(Q.order_payments, order_id)
    return _json(order_json(row, payments))


@api.get("/v1/orders")
async def list_orders(request: Request, limit: int = DEFAULT_LIST_LIMIT) -> Response:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise bad("limit", f"must be from 1 to {MAX_LIST_LIMIT}")
    core = runtime(request).core
    _, key = await holder_summary(request, core.pool, core.secret)
    rows = await core.pool.fetch(Q.orders_for_key, key["id"], limit)
    return _json({"object": "list", "data": [order_json(r) for r in rows]})


@api.get("/v1/payments/options")
async def payment_options(request: Request) -> Response:
    rt = runtime(request)
    low, high = rt.settings.min_order_usd, rt.settings.max_order_usd
    processors = []
    for name, processor in sorted(rt.processors.items()):
        coins = []
        for option in await processor.options():
            minimum = max(low, option.min_amount_usd) if option.min_amount_usd else low
            coins.append({"coin": option.coin, "min_amount_usd": format_usd(minimum)})
        processors.append(
            {
                "processor": name,
                "name": processor.display_name or name,
                "hosted_checkout": processor.hosted,
                "pay_currency_optional": processor.accepts(None),
                "coins": coins,
            }
        )
    return _json(
        {
            "processors": processors,
            "min_amount_usd": format_usd(low),
            "max_amount_usd": format_usd(high),
            "email_recovery": rt.mailer.configured,
            "partially_paid_policy": rt.settings.partially_paid_policy,
        }
    )
