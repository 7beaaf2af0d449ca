"""A fake BTCPay Server (Greenfield API): a real HTTP server on 127.0.0.1.

Invoices follow the documented fields (amounts as decimal strings, times as unix seconds);
auth is `Authorization: token <key>` with Greenfield's error shapes. Store webhooks are sent
as indented JSON signed over the raw bytes (`BTCPay-Sig: sha256=<hex>`).

Tests drive invoices with `pay`, `settle`, `expire` and `invalidate`, each returning the
webhook events BTCPay would emit; `deliver` posts any event, in any order, as often as
wanted (a repeat can be marked as a redelivery, as BTCPay's UI does).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp
from aiohttp import web

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _new_id(length: int = 22) -> str:
    return "".join(secrets.choice(_B58) for _ in range(length))


def _money(value: Decimal) -> str:
    """A decimal string with at least two places, as Greenfield writes amounts."""
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent >= -2:
        value = value.quantize(Decimal("0.01"))
    return format(value, "f")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


@dataclass
class FakeInvoice:
    id: str
    store_id: str
    amount: Decimal
    currency: str
    metadata: dict[str, Any]
    checkout: dict[str, Any]
    created: int
    expiration: int
    status: str = "New"
    additional_status: str = "None"
    paid: Decimal = Decimal(0)
    events: list[str] = field(default_factory=list)


class FakeBTCPay:
    def __init__(
        self,
        *,
        api_key: str = "btcpay-test-api-key",
        store_id: str = "StoreFake1111111111111111111111111111111111",
        webhook_secret: str = "btcpay-test-webhook-secret",
        webhook_url: str | None = None,
    ) -> None:
        self.api_key = api_key
        self.store_id = store_id
        self.webhook_secret = webhook_secret
        self.webhook_url = webhook_url
        self.webhook_id = _new_id()
        self.invoices: dict[str, FakeInvoice] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.deliveries: list[tuple[str, int]] = []  # (event type, HTTP status answered)
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeBTCPay:
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/api/v1/stores/{store_id}/invoices", self._create)
        app.router.add_get("/api/v1/stores/{store_id}/invoices/{invoice_id}", self._get)
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
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("token ") or not hmac.compare_digest(auth[6:], self.api_key):
            return _error(
                401, "unauthenticated", "Authentication is required for accessing this endpoint"
            )
        if request.match_info.get("store_id") != self.store_id:
            return _error(404, "store-not-found", "The store was not found")
        return await handler(request)

    def invoice_json(self, invoice: FakeInvoice) -> dict[str, Any]:
        return {
            "id": invoice.id,
            "storeId": invoice.store_id,
            "amount": _money(invoice.amount),
            "paidAmount": _money(invoice.paid),
            "currency": invoice.currency,
            "type": "Standard",
            "checkoutLink": f"{self.url}/i/{invoice.id}",
            "createdTime": invoice.created,
            "expirationTime": invoice.expiration,
            "monitoringExpiration": invoice.expiration + 3600,
            "status": invoice.status,
            "additionalStatus": invoice.additional_status,
            "availableStatusesForManualMarking": ["Settled", "Invalid"],
            "archived": False,
            "metadata": invoice.metadata,
            "checkout": invoice.checkout,
        }

    async def _create(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "invalid-json", "The request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid-json", "The request body is not valid JSON")
        errors = []
        try:
            amount = Decimal(str(body.get("amount")))
            if not amount.is_finite() or amount <= 0:
                raise InvalidOperation
        except InvalidOperation:
            errors.append({"path": "amount", "message": "Amount should be more than 0"})
            amount = Decimal(0)
        currency = body.get("currency")
        if not isinstance(currency, str) or not currency:
            errors.append({"path": "currency", "message": "Currency is required"})
        if errors:
            return web.json_response(errors, status=422)
        checkout = dict(body.get("checkout") or {})
        minutes = int(checkout.get("expirationMinutes") or 15)
        now = int(time.time())
        invoice = FakeInvoice(
            id=_new_id(),
            store_id=self.store_id,
            amount=amount,
            currency=str(currency).upper(),
            metadata=dict(body.get("metadata") or {}),
            checkout=checkout,
            created=now,
            expiration=now + minutes * 60,
        )
        self.invoices[invoice.id] = invoice
        return web.json_response(self.invoice_json(invoice))

    async def _get(self, request: web.Request) -> web.Response:
        invoice = self.invoices.get(request.match_info["invoice_id"])
        if invoice is None:
            return _error(404, "invoice-not-found", "The invoice was not found")
        return web.json_response(self.invoice_json(invoice))

    # --- invoice lifecycle, driven by tests ---------------------------------------------

    def invoice_for_order(self, order_id: str) -> FakeInvoice:
        for invoice in self.invoices.values():
            if invoice.metadata.get("orderId") == order_id:
                return invoice
        raise KeyError(order_id)

    def _event(self, invoice: FakeInvoice, event_type: str, **extra: Any) -> dict[str, Any]:
        delivery = _new_id()
        invoice.events.append(event_type)
        return {
            "deliveryId": delivery,
            "webhookId": self.webhook_id,
            "originalDeliveryId": delivery,
            "isRedelivery": False,
            "type": event_type,
            "timestamp": int(time.time()),
            "storeId": invoice.store_id,
            "invoiceId": invoice.id,
            "metadata": invoice.metadata,
            **extra,
        }

    def created_event(self, invoice_id: str) -> dict[str, Any]:
        return self._event(self.invoices[invoice_id], "InvoiceCreated")

    def pay(self, invoice_id: str, amount: Decimal | None = None) -> list[dict[str, Any]]:
        """The buyer pays `amount` (in the invoice currency; default: what is due)."""
        invoice = self.invoices[invoice_id]
        due = invoice.amount - invoice.paid
        amount = due if amount is None else amount
        late = invoice.status == "Expired"
        invoice.paid += amount
        events = [
            self._event(
                invoice, "InvoiceReceivedPayment", afterExpiration=late, paymentMethod="BTC"
            )
        ]
        if invoice.paid < invoice.amount:
            invoice.additional_status = "PaidPartial"
        elif late:
            invoice.additional_status = "PaidLate"
        else:
            invoice.status = "Processing"
            invoice.additional_status = "PaidOver" if invoice.paid > invoice.amount else "None"
            events.append(
                self._event(invoice, "InvoiceProcessing", overPaid=invoice.paid > invoice.amount)
            )
        return events

    def settle(self, invoice_id: str) -> list[dict[str, Any]]:
        invoice = self.invoices[invoice_id]
        invoice.status = "Settled"
        over = invoice.paid > invoice.amount
        invoice.additional_status = "PaidOver" if over else "None"
        return [
            self._event(invoice, "InvoicePaymentSettled", afterExpiration=False),
            self._event(invoice, "InvoiceSettled", manuallyMarked=False, overPaid=over),
        ]

    def expire(self, invoice_id: str) -> list[dict[str, Any]]:
        invoice = self.invoices[invoice_id]
        invoice.status = "Expired"
        partial = Decimal(0) < invoice.paid < invoice.amount
        invoice.additional_status = "PaidPartial" if partial else "None"
        return [self._event(invoice, "InvoiceExpired", partiallyPaid=partial, paidOver=False)]

    def invalidate(self, invoice_id: str) -> list[dict[str, Any]]:
        invoice = self.invoices[invoice_id]
        invoice.status = "Invalid"
        return [self._event(invoice, "InvoiceInvalid", manuallyMarked=False)]

    # --- webhook delivery ----------------------------------------------------------------

    def sign(self, raw: bytes) -> str:
        return "sha256=" + hmac.new(self.webhook_secret.encode(), raw, hashlib.sha256).hexdigest()

    async def deliver(
        self,
        event: dict[str, Any],
        *,
        redelivery: bool = False,
        signature: str | None = None,
        raw: bytes | None = None,
        url: str | None = None,
    ) -> int:
        """POST one event as BTCPay does: indented JSON signed over its raw bytes."""
        assert self._client is not None
        target = url or self.webhook_url
        assert target, "no webhook URL configured"
        if redelivery:
            event = {**event, "deliveryId": _new_id(), "isRedelivery": True}
        data = raw if raw is not None else json.dumps(event, indent=2).encode()
        headers = {
            "Content-Type": "application/json",
            "BTCPay-Sig": signature if signature is not None else self.sign(data),
        }
        async with self._client.post(target, data=data, headers=headers) as response:
            await response.read()
            self.deliveries.append((str(event.get("type")), response.status))
            return response.status
