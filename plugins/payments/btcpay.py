"""`btcpay`: a self-hosted BTCPay Server, through Greenfield invoices and store webhooks.

Every order is an invoice whose checkout page the buyer pays; our order id travels in the
invoice metadata. BTCPay webhooks are configured per store (in BTCPay's UI, pointing at
`<APIFAST_PUBLIC_URL>/v1/webhooks/btcpay`), so no callback URL is sent per invoice.

The webhook signature is HMAC-SHA256 of the raw body bytes, in `BTCPay-Sig: sha256=<hex>`.
Webhooks carry no amounts, so a partial payment is priced by fetching the invoice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from apifast import hookimpl
from apifast.payments import (
    CreatedPayment,
    PaymentError,
    PaymentOrder,
    PaymentProcessor,
    PaymentStatus,
    PaymentUpdate,
    RegisterPaymentProcessor,
    WebhookPayloadError,
    WebhookSignatureError,
    get_header,
)
from apifast.plugins.payments.http import JsonClient

log = logging.getLogger("apifast.payments.btcpay")

SIGNATURE_HEADER = "BTCPay-Sig"

# Webhook event type -> normalized status. Amounts are not in webhooks; see fetch_payment.
_EVENT_STATUS = {
    "InvoiceCreated": PaymentStatus.WAITING,
    "InvoiceReceivedPayment": PaymentStatus.CONFIRMING,
    "InvoicePaymentSettled": PaymentStatus.CONFIRMING,
    "InvoiceProcessing": PaymentStatus.CONFIRMING,
    "InvoiceSettled": PaymentStatus.FINISHED,
    "InvoiceExpired": PaymentStatus.EXPIRED,
    "InvoiceInvalid": PaymentStatus.FAILED,
}


def webhook_signature(secret: str, raw_body: bytes) -> str:
    """The `BTCPay-Sig` header value for a raw body."""
    return "sha256=" + hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return None
    try:
        parsed = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return parsed if parsed.is_finite() else None


def invoice_status(invoice: Mapping[str, Any]) -> tuple[PaymentStatus, Decimal | None]:
    """The normalized status of a Greenfield invoice and the USD value to credit."""
    status = str(invoice.get("status") or "")
    extra = str(invoice.get("additionalStatus") or "None")
    usd = str(invoice.get("currency") or "").upper() == "USD"
    amount = _decimal(invoice.get("amount")) if usd else None
    paid = _decimal(invoice.get("paidAmount")) if usd else None
    if status == "Settled":
        return PaymentStatus.FINISHED, amount
    if status == "Processing":
        return PaymentStatus.CONFIRMING, None
    if status == "Expired":
        if extra == "PaidLate":
            # The full amount arrived after expiry: it is money received all the same.
            return PaymentStatus.FINISHED, amount
        if extra == "PaidPartial" and paid is not None and amount is not None and paid > 0:
            return PaymentStatus.PARTIALLY_PAID, min(paid, amount)
        if extra == "PaidPartial":
            return PaymentStatus.PARTIALLY_PAID, None
        return PaymentStatus.EXPIRED, None
    if status == "Invalid":
        return PaymentStatus.FAILED, None
    if status == "New":
        return PaymentStatus.WAITING, None
    raise ValueError(f"unknown invoice status {status[:40]!r}")


def _order_id(metadata: Any) -> str | None:
    if isinstance(metadata, dict):
        value = metadata.get("orderId")
        if isinstance(value, str) and value:
            return value
    return None


def _created_time(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        return None
    return datetime.fromtimestamp(int(value), UTC)


class BTCPayProcessor(PaymentProcessor):
    name = "btcpay"
    display_name = "BTCPay Server"
    hosted = True

    def __init__(
        self,
        *,
        url: str,
        api_key: str,
        store_id: str,
        webhook_secret: str,
        coins: tuple[str, ...] = ("btc",),
        invoice_minutes: int = 60,
        redirect_url: str | None = None,
        timeout_s: float = 20.0,
    ) -> None:
        self._store_id = store_id
        self._secret = webhook_secret
        self._invoice_minutes = invoice_minutes
        self._redirect_url = redirect_url
        self.coins = tuple(c.strip().lower() for c in coins if c.strip())
        self._http = JsonClient(url, {"Authorization": f"token {api_key}"}, timeout_s=timeout_s)

    @classmethod
    def from_settings(cls, settings: Any) -> BTCPayProcessor | None:
        values = {
            "APIFAST_BTCPAY_URL": settings.btcpay_url.strip(),
            "APIFAST_BTCPAY_API_KEY": settings.btcpay_api_key.strip(),
            "APIFAST_BTCPAY_STORE_ID": settings.btcpay_store_id.strip(),
            "APIFAST_BTCPAY_WEBHOOK_SECRET": settings.btcpay_webhook_secret.strip(),
        }
        if not any(values.values()):
            return None
        missing = [name for name, value in values.items() if not value]
        if missing:
            raise ValueError(f"btcpay is half configured: set {', '.join(missing)} too")
        return cls(
            url=values["APIFAST_BTCPAY_URL"],
            api_key=values["APIFAST_BTCPAY_API_KEY"],
            store_id=values["APIFAST_BTCPAY_STORE_ID"],
            webhook_secret=values["APIFAST_BTCPAY_WEBHOOK_SECRET"],
            coins=tuple(settings.btcpay_coins.split(",")),
            invoice_minutes=settings.btcpay_invoice_minutes,
            redirect_url=settings.public_url.rstrip("/") or None,
            timeout_s=settings.payment_http_timeout_s,
        )

    async def start(self) -> None:
        await self._http.start()

    async def close(self) -> None:
        await self._http.close()

    def _invoices(self) -> str:
        return f"/api/v1/stores/{self._store_id}/invoices"

    async def create_payment(self, order: PaymentOrder) -> CreatedPayment:
        checkout: dict[str, Any] = {"expirationMinutes": self._invoice_minutes}
        if self._redirect_url:
            checkout["redirectURL"] = self._redirect_url
        body = {
            "amount": format(order.amount_usd, "f"),
            "currency": "USD",
            "metadata": {"orderId": order.order_id},
            "checkout": checkout,
        }
        answer = await self._http.request("POST", self._invoices(), body=json.dumps(body).encode())
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
            raise PaymentError("create invoice: answer has no id")
        return CreatedPayment(
            payment_id=answer["id"],
            pay_currency=order.pay_currency,
            payment_url=str(answer.get("checkoutLink") or "") or None,
            expires_at=_created_time(answer.get("expirationTime")),
        )

    def verify_webhook(self, headers: Mapping[str, str], raw_body: bytes) -> PaymentUpdate | None:
        header = (get_header(headers, SIGNATURE_HEADER) or "").strip()
        if not header:
            raise WebhookSignatureError(f"missing {SIGNATURE_HEADER} header")
        # The signature covers the raw bytes; the body is never re-serialized.
        expected = webhook_signature(self._secret, raw_body)
        if not hmac.compare_digest(expected.encode(), header.lower().encode("ascii", "replace")):
            raise WebhookSignatureError("signature does not match")
        try:
            event = json.loads(raw_body, parse_float=Decimal)
        except (ValueError, RecursionError) as exc:
            raise WebhookPayloadError("body is not JSON") from exc
        if not isinstance(event, dict):
            raise WebhookPayloadError("body is not a JSON object")
        event_type = event.get("type")
        invoice_id = event.get("invoiceId")
        if not isinstance(event_type, str) or not isinstance(invoice_id, str) or not invoice_id:
            raise WebhookPayloadError("type or invoiceId is missing")
        if event.get("storeId") not in (None, self._store_id):
            log.warning("btcpay: webhook for another store ignored")
            return None
        status = _EVENT_STATUS.get(event_type)
        if status is None:
            return None
        if event_type == "InvoiceExpired" and event.get("partiallyPaid") is True:
            status = PaymentStatus.PARTIALLY_PAID
        # The event names the invoice but not the amounts, and a late payment to an expired
        # invoice arrives as a mere "received payment": the invoice itself is the truth.
        return PaymentUpdate(
            processor=self.name,
            payment_id=invoice_id,
            order_id=_order_id(event.get("metadata")),
            status=status,
            raw_status=event_type,
            refetch=True,
        )

    async def fetch_payment(self, payment_id: str) -> PaymentUpdate:
        answer = await self._http.request("GET", f"{self._invoices()}/{payment_id}")
        if not isinstance(answer, dict):
            raise PaymentError("get invoice: answer is not an object")
        try:
            status, credit = invoice_status(answer)
        except ValueError as exc:
            raise PaymentError(f"get invoice: {exc}") from exc
        return PaymentUpdate(
            processor=self.name,
            payment_id=str(answer.get("id") or payment_id),
            order_id=_order_id(answer.get("metadata")),
            status=status,
            raw_status=f"{answer.get('status')}/{answer.get('additionalStatus')}",
            credit_usd=credit,
        )


@hookimpl
def register_payment_processors(register: RegisterPaymentProcessor) -> None:
    register("btcpay", BTCPayProcessor)
