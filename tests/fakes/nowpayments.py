"""A fake NOWPayments API: a real HTTP server on 127.0.0.1 following the documented wire format.

Amounts are held as JavaScript holds them (doubles) and written as Node's `JSON.stringify`
writes them; ids are strings on create and numbers in IPNs and `GET /payment/{id}`. The fake
signs IPNs with its own, independent implementation of the documented algorithm, so tests
check ApiFast's verifier against it rather than against itself.

Tests drive payments through methods (`pay`, `set_status`, `repeat_deposit`, ...), each of
which returns a snapshot of the IPN body; `deliver` posts any snapshot, in any order, as
often as wanted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_UP, Decimal
from typing import Any

import aiohttp
from aiohttp import web

# USD per coin; pay amounts are price / rate rounded up to 8 places.
DEFAULT_RATES = {
    "btc": Decimal("50000"),
    "eth": Decimal("2500"),
    "ltc": Decimal("80"),
    "xmr": Decimal("150"),
    "usdttrc20": Decimal("1"),
    "trx": Decimal("0.1"),
}
_8DP = Decimal("0.00000001")


def _js_number(value: float) -> str:
    """Node's Number#toString, from Python's shortest repr."""
    if value == 0:
        return "0"
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    if "e" not in text:
        return text
    if 1e-6 <= abs(value) < 1e21:
        return format(Decimal(text), "f")
    mantissa, exp = text.split("e")
    sign = "-" if exp.startswith("-") else "+"
    return f"{mantissa}e{sign}{int(exp.lstrip('+-'))}"


def _node_json(value: Any, *, sort: bool) -> str:
    """JSON.stringify, compact, optionally with keys sorted (NOWPayments' sortObject)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, Decimal)):
        return _js_number(float(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        keys = sorted(value) if sort else list(value)
        return (
            "{" + ",".join(f"{json.dumps(k)}:{_node_json(value[k], sort=sort)}" for k in keys) + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(_node_json(v, sort=sort) for v in value) + "]"
    raise TypeError(type(value).__name__)


def sign_ipn(secret: str, body: dict[str, Any]) -> str:
    return hmac.new(
        secret.encode(), _node_json(body, sort=True).encode(), hashlib.sha512
    ).hexdigest()


def _iso(moment: datetime) -> str:
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"status": False, "statusCode": status, "code": code, "message": message}, status=status
    )


@dataclass
class FakePayment:
    payment_id: int
    price_amount: Decimal
    pay_currency: str
    pay_amount: Decimal
    pay_address: str
    order_id: str | None
    order_description: str | None
    ipn_callback_url: str | None
    purchase_id: int
    created_at: datetime
    invoice_id: int | None = None
    parent_payment_id: int | None = None
    status: str = "waiting"
    actually_paid: Decimal = Decimal(0)
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class FakeInvoice:
    invoice_id: int
    price_amount: Decimal
    pay_currency: str | None
    order_id: str | None
    order_description: str | None
    ipn_callback_url: str | None
    token_id: str
    created_at: datetime


class FakeNowPayments:
    def __init__(
        self,
        *,
        api_key: str = "np-test-api-key",
        ipn_secret: str = "np-test-ipn-secret",
        rates: dict[str, Decimal] | None = None,
        min_usd: Decimal = Decimal("0.50"),
    ) -> None:
        self.api_key = api_key
        self.ipn_secret = ipn_secret
        self.rates = dict(rates or DEFAULT_RATES)
        self.min_usd = min_usd
        self.payments: dict[int, FakePayment] = {}
        self.invoices: dict[int, FakeInvoice] = {}
        # Every request seen: (method, path, headers) — tests check what ApiFast sends.
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.deliveries: list[tuple[int, int]] = []  # (payment_id, HTTP status answered)
        self._ids = itertools.count(5_077_000_001)
        # A slow processor, for races: while `create_gate` is set to an Event, each payment
        # being created sets `create_entered` and waits for the gate before it is answered.
        self.create_gate: asyncio.Event | None = None
        self.create_entered = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self.port = 0

    # --- server -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> FakeNowPayments:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/v1/currencies", self._currencies)
        app.router.add_get("/v1/min-amount", self._min_amount)
        app.router.add_get("/v1/estimate", self._estimate)
        app.router.add_post("/v1/payment", self._create_payment)
        app.router.add_post("/v1/invoice", self._create_invoice)
        app.router.add_get("/v1/payment/{payment_id}", self._get_payment)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._client = aiohttp.ClientSession()
        return self

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.headers)))
        return await handler(request)

    def _authorized(self, request: web.Request) -> bool:
        return hmac.compare_digest(request.headers.get("x-api-key", ""), self.api_key)

    async def _json_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        if not request.content_type.startswith("application/json"):
            return _error(400, "INVALID_REQUEST_PARAMS", "Content-Type must be application/json")
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "INVALID_REQUEST_PARAMS", "Invalid JSON")
        if not isinstance(body, dict):
            return _error(400, "INVALID_REQUEST_PARAMS", "Invalid JSON")
        return body

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response({"message": "OK"})

    async def _currencies(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(403, "INVALID_API_KEY", "Invalid api key")
        return web.json_response({"currencies": sorted(self.rates)})

    async def _min_amount(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(403, "INVALID_API_KEY", "Invalid api key")
        coin = request.query.get("currency_from", "")
        if coin not in self.rates:
            return _error(400, "INVALID_REQUEST_PARAMS", "currency_from is invalid")
        body: dict[str, Any] = {
            "currency_from": coin,
            "currency_to": request.query.get("currency_to", coin),
            "min_amount": float(self.min_usd / self.rates[coin]),
        }
        if request.query.get("fiat_equivalent"):
            body["fiat_equivalent"] = float(self.min_usd)
        return web.Response(text=_node_json(body, sort=False), content_type="application/json")

    async def _estimate(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(403, "INVALID_API_KEY", "Invalid api key")
        coin = request.query.get("currency_to", "")
        if coin not in self.rates:
            return _error(400, "INVALID_REQUEST_PARAMS", "currency_to is invalid")
        amount = Decimal(request.query.get("amount", "0"))
        body = {
            "currency_from": "usd",
            "amount_from": float(amount),
            "currency_to": coin,
            "estimated_amount": float(self._pay_amount(amount, coin)),
        }
        return web.Response(text=_node_json(body, sort=False), content_type="application/json")

    def _pay_amount(self, price: Decimal, coin: str) -> Decimal:
        return (price / self.rates[coin]).quantize(_8DP, rounding=ROUND_UP)

    def _check_price(self, body: dict[str, Any]) -> Decimal | web.Response:
        price = body.get("price_amount")
        if isinstance(price, bool) or not isinstance(price, (int, float)):
            return _error(400, "INVALID_REQUEST_PARAMS", '"price_amount" must be a number')
        if str(body.get("price_currency", "")).lower() != "usd":
            return _error(400, "INVALID_REQUEST_PARAMS", '"price_currency" is invalid')
        amount = Decimal(repr(price)) if isinstance(price, float) else Decimal(price)
        if amount < self.min_usd:
            return _error(400, "AMOUNT_MINIMAL_ERROR", "amountTo is too small")
        return amount

    async def _create_payment(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(403, "INVALID_API_KEY", "Invalid api key")
        if self.create_gate is not None:
            self.create_entered.set()
            await self.create_gate.wait()
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        price = self._check_price(body)
        if isinstance(price, web.Response):
            return price
        coin = str(body.get("pay_currency", "")).lower()
        if coin not in self.rates:
            return _error(400, "INVALID_REQUEST_PARAMS", '"pay_currency" is invalid')
        payment = self._new_payment(
            price=price,
            coin=coin,
            order_id=body.get("order_id"),
            description=body.get("order_description"),
            callback=body.get("ipn_callback_url"),
        )
        created = {
            "payment_id": str(payment.payment_id),
            "payment_status": payment.status,
            "pay_address": payment.pay_address,
            "price_amount": float(payment.price_amount),
            "price_currency": "usd",
            "pay_amount": float(payment.pay_amount),
            "amount_received": float(payment.pay_amount),
            "pay_currency": coin,
            "order_id": payment.order_id,
            "order_description": payment.order_description,
            "ipn_callback_url": payment.ipn_callback_url,
            "created_at": _iso(payment.created_at),
            "updated_at": _iso(payment.updated_at),
            "purchase_id": str(payment.purchase_id),
            "smart_contract": None,
            "network": coin,
            "network_precision": None,
            "time_limit": None,
            "burning_percent": None,
            "expiration_estimate_date": _iso(payment.created_at + timedelta(days=7)),
            "is_fixed_rate": bool(body.get("is_fixed_rate", False)),
            "is_fee_paid_by_user": bool(body.get("is_fee_paid_by_user", False)),
            "valid_until": _iso(payment.created_at + timedelta(days=7)),
            "type": "crypto2crypto",
            "payin_extra_id": None,
        }
        return web.Response(
            text=_node_json(created, sort=False), status=201, content_type="application/json"
        )

    async def _create_invoice(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(403, "INVALID_API_KEY", "Invalid api key")
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        price = self._check_price(body)
        if isinstance(price, web.Response):
            return price
        invoice = FakeInvoice(
            invoice_id=next(self._ids),
            price_amount=price,
            pay_currency=body.get("pay_currency"),
            order_id=body.get("order_id"),
            order_description=body.get("order_description"),
            ipn_callback_url=body.get("ipn_callback_url"),
            token_id=f"tok{len(self.invoices) + 1:05d}",
            created_at=datetime.now(UTC),
        )
        self.invoices[invoice.invoice_id] = invoice
        created = {
            "id": str(invoice.invoice_id),
            "token_id": invoice.token_id,
            "order_id": invoice.order_id,
            "order_description": invoice.order_description,
            "price_amount": format(price, "f"),  # a string here, as documented
            "price_currency": "usd",
            "pay_currency": invoice.pay_currency,
            "ipn_callback_url": invoice.ipn_callback_url,
            "invoice_url": f"http://127.0.0.1:{self.port}/payment/?iid={invoice.invoice_id}",
            "success_url": body.get("success_url"),
            "cancel_url": body.get("cancel_url"),
            "created_at": _iso(invoice.created_at),
            "updated_at": _iso(invoice.created_at),
        }
        return web.Response(
            text=_node_json(created, sort=False), status=201, content_type="application/json"
        )

    async def _get_payment(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(403, "INVALID_API_KEY", "Invalid api key")
        try:
            payment = self.payments[int(request.match_info["payment_id"])]
        except (KeyError, ValueError):
            return _error(404, "NOT_FOUND", "Payment not found")
        body = {
            "payment_id": payment.payment_id,
            "invoice_id": payment.invoice_id,
            "payment_status": payment.status,
            "pay_address": payment.pay_address,
            "payin_extra_id": None,
            "price_amount": float(payment.price_amount),
            "price_currency": "usd",
            "pay_amount": float(payment.pay_amount),
            "actually_paid": float(payment.actually_paid),
            "pay_currency": payment.pay_currency,
            "order_id": payment.order_id,
            "order_description": payment.order_description,
            "purchase_id": payment.purchase_id,
            "outcome_amount": float(self._outcome(payment)),
            "outcome_currency": payment.pay_currency,
            "payout_hash": None,
            "payin_hash": None,
            "created_at": _iso(payment.created_at),
            "updated_at": _iso(payment.updated_at),
            "type": "crypto2crypto",
            "payment_extra_ids": None,
        }
        return web.Response(text=_node_json(body, sort=False), content_type="application/json")

    # --- payment lifecycle, driven by tests ---------------------------------------------

    def _new_payment(
        self,
        *,
        price: Decimal,
        coin: str,
        order_id: Any,
        description: Any,
        callback: Any,
        invoice_id: int | None = None,
        parent: FakePayment | None = None,
        pay_amount: Decimal | None = None,
    ) -> FakePayment:
        payment_id = next(self._ids)
        payment = FakePayment(
            payment_id=payment_id,
            price_amount=price,
            pay_currency=coin,
            pay_amount=pay_amount if pay_amount is not None else self._pay_amount(price, coin),
            pay_address=parent.pay_address if parent else f"{coin}addr{payment_id}",
            order_id=order_id if isinstance(order_id, str) else None,
            order_description=description if isinstance(description, str) else None,
            ipn_callback_url=callback if isinstance(callback, str) else None,
            purchase_id=payment_id + 900_000_000,
            created_at=datetime.now(UTC),
            invoice_id=invoice_id,
            parent_payment_id=parent.payment_id if parent else None,
        )
        self.payments[payment_id] = payment
        return payment

    def _outcome(self, payment: FakePayment) -> Decimal:
        return (payment.actually_paid * Decimal("0.995")).quantize(_8DP)

    def ipn_body(self, payment_id: int | str) -> dict[str, Any]:
        """The IPN NOWPayments would send for this payment's current state, in its field
        order (the signature is over the sorted form)."""
        p = self.payments[int(payment_id)]
        actually_paid_usd = (p.actually_paid * self.rates[p.pay_currency]).quantize(_8DP)
        return {
            "payment_id": p.payment_id,
            "parent_payment_id": p.parent_payment_id,
            "invoice_id": p.invoice_id,
            "payment_status": p.status,
            "pay_address": p.pay_address,
            "payin_extra_id": None,
            "price_amount": float(p.price_amount),
            "price_currency": "usd",
            "pay_amount": float(p.pay_amount),
            "actually_paid": float(p.actually_paid),
            "actually_paid_at_fiat": float(actually_paid_usd),
            "pay_currency": p.pay_currency,
            "order_id": p.order_id,
            "order_description": p.order_description,
            "purchase_id": str(p.purchase_id),
            "outcome_amount": float(self._outcome(p)),
            "outcome_currency": p.pay_currency,
            "payment_extra_ids": None,
            "fee": {
                "currency": p.pay_currency,
                "depositFee": float((p.actually_paid * Decimal("0.004")).quantize(_8DP)),
                "withdrawalFee": 0,
                "serviceFee": float((p.actually_paid * Decimal("0.001")).quantize(_8DP)),
            },
        }

    def set_status(
        self, payment_id: int | str, status: str, *, actually_paid: Decimal | None = None
    ) -> dict[str, Any]:
        payment = self.payments[int(payment_id)]
        payment.status = status
        if actually_paid is not None:
            payment.actually_paid = actually_paid
        payment.updated_at = datetime.now(UTC)
        return self.ipn_body(payment_id)

    def pay(self, payment_id: int | str, fraction: Decimal = Decimal(1)) -> dict[str, Any]:
        """The buyer sends `fraction` of the amount; the payment ends finished or, below
        the full amount, partially_paid. Returns the final IPN body."""
        payment = self.payments[int(payment_id)]
        paid = (payment.pay_amount * fraction).quantize(_8DP)
        status = "finished" if paid >= payment.pay_amount else "partially_paid"
        return self.set_status(payment_id, status, actually_paid=paid)

    def repeat_deposit(self, parent_id: int | str, amount: Decimal) -> dict[str, Any]:
        """A second deposit of `amount` coins to a paid payment's address: a new, finished
        payment whose price is that deposit's USD value, with `parent_payment_id` set."""
        parent = self.payments[int(parent_id)]
        price = (amount * self.rates[parent.pay_currency]).quantize(Decimal("0.01"))
        child = self._new_payment(
            price=price,
            coin=parent.pay_currency,
            order_id=parent.order_id,
            description=parent.order_description,
            callback=parent.ipn_callback_url,
            invoice_id=parent.invoice_id,
            parent=parent,
            pay_amount=amount,
        )
        return self.set_status(child.payment_id, "finished", actually_paid=amount)

    def pay_invoice(self, invoice_id: int | str, coin: str) -> int:
        """The buyer opens the hosted invoice and picks a coin: a payment is created."""
        invoice = self.invoices[int(invoice_id)]
        payment = self._new_payment(
            price=invoice.price_amount,
            coin=coin,
            order_id=invoice.order_id,
            description=invoice.order_description,
            callback=invoice.ipn_callback_url,
            invoice_id=invoice.invoice_id,
        )
        return payment.payment_id

    def payment_for_order(self, order_id: str) -> FakePayment:
        for payment in self.payments.values():
            if payment.order_id == order_id and payment.parent_payment_id is None:
                return payment
        raise KeyError(order_id)

    # --- IPN delivery --------------------------------------------------------------------

    async def deliver(
        self,
        body: dict[str, Any],
        *,
        url: str | None = None,
        signature: str | None = None,
        raw: bytes | None = None,
    ) -> int:
        """POST one IPN to the payment's callback URL; returns the HTTP status received.
        `signature` / `raw` override what is sent, to test rejection."""
        assert self._client is not None
        payment = self.payments[int(body["payment_id"])]
        target = url or payment.ipn_callback_url
        assert target, "payment has no ipn_callback_url"
        data = raw if raw is not None else _node_json(body, sort=False).encode()
        headers = {
            "Content-Type": "application/json",
            "x-nowpayments-sig": signature
            if signature is not None
            else sign_ipn(self.ipn_secret, body),
        }
        async with self._client.post(target, data=data, headers=headers) as response:
            await response.read()
            self.deliveries.append((payment.payment_id, response.status))
            return response.status
