"""`nowpayments`: NOWPayments' hosted crypto payments (`POST /payment`, `POST /invoice`,
`GET /payment/{id}` and the IPN webhook).

With a coin chosen, an order becomes a payment with an address to pay; without one, a hosted
invoice page where the buyer picks the coin. Either way every IPN carries our order id.

The IPN signature is HMAC-SHA512 over the body re-serialized as Node writes it: keys sorted
recursively, compact, numbers in JavaScript form (see `js_json`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from apifast import hookimpl
from apifast.payments import (
    CreatedPayment,
    PaymentError,
    PaymentOption,
    PaymentOrder,
    PaymentProcessor,
    PaymentStatus,
    PaymentUpdate,
    RegisterPaymentProcessor,
    WebhookPayloadError,
    WebhookSignatureError,
    get_header,
    proportional_credit,
)
from apifast.plugins.payments.http import JsonClient
from apifast.plugins.payments.js_json import canonical_json, doubles_exactly, loads_exact

log = logging.getLogger("apifast.payments.nowpayments")

SIGNATURE_HEADER = "x-nowpayments-sig"
_MIN_AMOUNT_TTL_S = 3600.0
_MIN_AMOUNT_RETRY_S = 60.0
_CENT = Decimal("0.01")


def ipn_signature(secret: str, body: Any) -> str:
    """Hex HMAC-SHA512 of the canonical form of an already-parsed IPN body."""
    message = canonical_json(body).encode()
    # The official SDK trims the secret; copy-pasted secrets often carry a newline.
    return hmac.new(secret.strip().encode(), message, hashlib.sha512).hexdigest()


def _decimal(value: Any) -> Decimal | None:
    """An exact amount from a JSON value (int, Decimal, or numeric string)."""
    if value is None or isinstance(value, bool) or isinstance(value, float):
        return None
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, str):
        try:
            parsed = Decimal(value.strip())
        except InvalidOperation:
            return None
        return parsed if parsed.is_finite() else None
    return None


def _id(value: Any) -> str | None:
    """Ids come as strings on create and as numbers elsewhere; we keep them as strings."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return str(value) if value == value.to_integral_value() else None
    if isinstance(value, (int, str)):
        text = str(value).strip()
        return text or None
    return None


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def credit_for(body: Mapping[str, Any], status: PaymentStatus) -> Decimal | None:
    """The USD value to credit for a payment object (IPN or GET /payment).

    Paid in full: the price. Partially paid: the price in proportion to what arrived
    (`actually_paid / pay_amount`), as NOWPayments advises for balance top-ups.
    """
    if str(body.get("price_currency") or "").lower() != "usd":
        return None
    price = _decimal(body.get("price_amount"))
    if price is None:
        return None
    if status is PaymentStatus.FINISHED:
        return price
    if status is PaymentStatus.PARTIALLY_PAID:
        paid = _decimal(body.get("actually_paid"))
        expected = _decimal(body.get("pay_amount"))
        if paid is None or expected is None:
            return None
        return proportional_credit(price, paid, expected)
    return None


class NowPaymentsProcessor(PaymentProcessor):
    name = "nowpayments"
    display_name = "NOWPayments"
    hosted = True  # Without a coin, the order gets NOWPayments' hosted invoice page.

    def __init__(
        self,
        *,
        api_key: str,
        ipn_secret: str,
        base_url: str = "https://api.nowpayments.io/v1",
        coins: tuple[str, ...] = ("btc",),
        fixed_rate: bool = False,
        timeout_s: float = 20.0,
    ) -> None:
        self._ipn_secret = ipn_secret
        self._fixed_rate = fixed_rate
        self.coins = tuple(c.strip().lower() for c in coins if c.strip())
        self._http = JsonClient(base_url, {"x-api-key": api_key}, timeout_s=timeout_s)
        # coin -> (fetched at, USD minimum); an instance cache, refreshed hourly.
        self._min_cache: dict[str, tuple[float, Decimal | None]] = {}

    @classmethod
    def from_settings(cls, settings: Any) -> NowPaymentsProcessor | None:
        api_key = settings.nowpayments_api_key.strip()
        secret = settings.nowpayments_ipn_secret.strip()
        if not api_key and not secret:
            return None
        if not api_key or not secret:
            missing = (
                "APIFAST_NOWPAYMENTS_API_KEY" if not api_key else "APIFAST_NOWPAYMENTS_IPN_SECRET"
            )
            raise ValueError(f"nowpayments is half configured: set {missing} too")
        return cls(
            api_key=api_key,
            ipn_secret=secret,
            base_url=settings.nowpayments_base_url,
            coins=tuple(settings.nowpayments_coins.split(",")),
            fixed_rate=settings.nowpayments_fixed_rate,
            timeout_s=settings.payment_http_timeout_s,
        )

    async def start(self) -> None:
        await self._http.start()

    async def close(self) -> None:
        await self._http.close()

    async def options(self) -> list[PaymentOption]:
        return [PaymentOption(coin, await self._min_amount_usd(coin)) for coin in self.coins]

    async def _min_amount_usd(self, coin: str) -> Decimal | None:
        cached = self._min_cache.get(coin)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _MIN_AMOUNT_TTL_S:
            return cached[1]
        try:
            answer = await self._http.request(
                "GET",
                "/min-amount",
                params={"currency_from": coin, "currency_to": coin, "fiat_equivalent": "usd"},
            )
        except PaymentError as exc:
            log.warning("nowpayments min-amount for %s failed: %s", coin, exc)
            # Keep what we had, and ask again in a minute rather than on every request.
            fallback = cached[1] if cached else None
            self._min_cache[coin] = (now - _MIN_AMOUNT_TTL_S + _MIN_AMOUNT_RETRY_S, fallback)
            return fallback
        value = _decimal(answer.get("fiat_equivalent")) if isinstance(answer, dict) else None
        minimum = value.quantize(_CENT, rounding=ROUND_CEILING) if value is not None else None
        self._min_cache[coin] = (now, minimum)
        return minimum

    async def create_payment(self, order: PaymentOrder) -> CreatedPayment:
        body: dict[str, Any] = {
            "price_amount": order.amount_usd,
            "price_currency": "usd",
            "order_id": order.order_id,
            "order_description": order.description,
        }
        if order.callback_url:
            body["ipn_callback_url"] = order.callback_url
        if self._fixed_rate:
            body["is_fixed_rate"] = True
        if order.pay_currency is None:
            answer = await self._http.request(
                "POST", "/invoice", body=canonical_json(body).encode()
            )
            if not isinstance(answer, dict) or _id(answer.get("id")) is None:
                raise PaymentError("POST /invoice: answer has no id")
            return CreatedPayment(
                payment_id=None,
                invoice_id=_id(answer["id"]),
                payment_url=str(answer.get("invoice_url") or "") or None,
            )
        body["pay_currency"] = order.pay_currency.lower()
        answer = await self._http.request("POST", "/payment", body=canonical_json(body).encode())
        payment_id = _id(answer.get("payment_id")) if isinstance(answer, dict) else None
        if payment_id is None:
            raise PaymentError("POST /payment: answer has no payment_id")
        expires = _parse_time(answer.get("expiration_estimate_date")) or _parse_time(
            answer.get("valid_until")
        )
        return CreatedPayment(
            payment_id=payment_id,
            pay_address=str(answer.get("pay_address") or "") or None,
            pay_amount=_decimal(answer.get("pay_amount")),
            pay_currency=str(answer.get("pay_currency") or order.pay_currency),
            pay_extra_id=str(answer.get("payin_extra_id") or "") or None,
            expires_at=expires,
        )

    def verify_webhook(self, headers: Mapping[str, str], raw_body: bytes) -> PaymentUpdate | None:
        signature = (get_header(headers, SIGNATURE_HEADER) or "").strip().lower()
        if not signature:
            raise WebhookSignatureError(f"missing {SIGNATURE_HEADER} header")
        try:
            body = loads_exact(raw_body)
        except (ValueError, RecursionError) as exc:
            raise WebhookPayloadError("body is not JSON") from exc
        try:
            expected = ipn_signature(self._ipn_secret, body)
        except (TypeError, ValueError, RecursionError) as exc:
            raise WebhookPayloadError("body cannot be canonicalized") from exc
        if not hmac.compare_digest(expected.encode(), signature.encode("ascii", "replace")):
            raise WebhookSignatureError("signature does not match")
        if not isinstance(body, dict):
            raise WebhookPayloadError("body is not a JSON object")
        if not doubles_exactly(body):
            raise WebhookPayloadError(
                "a number has more digits than a double holds, so its signature also signs "
                "the rounded number; refused"
            )
        return self._update(body)

    async def fetch_payment(self, payment_id: str) -> PaymentUpdate:
        answer = await self._http.request("GET", f"/payment/{payment_id}")
        if not isinstance(answer, dict):
            raise PaymentError("GET /payment: answer is not an object")
        try:
            update = self._update(answer)
        except WebhookPayloadError as exc:
            raise PaymentError(f"GET /payment: {exc}") from exc
        if update is None:
            raise PaymentError("GET /payment: unknown payment_status")
        return update

    def _update(self, body: Mapping[str, Any]) -> PaymentUpdate | None:
        payment_id = _id(body.get("payment_id"))
        if payment_id is None:
            raise WebhookPayloadError("payment_id is missing")
        raw_status = body.get("payment_status")
        if not isinstance(raw_status, str):
            raise WebhookPayloadError("payment_status is missing")
        try:
            status = PaymentStatus(raw_status.lower())
        except ValueError:
            # A status this version does not know: acknowledge, change nothing.
            log.warning("nowpayments: unknown payment_status %r ignored", raw_status[:40])
            return None
        order_id = body.get("order_id")
        return PaymentUpdate(
            processor=self.name,
            payment_id=payment_id,
            parent_payment_id=_id(body.get("parent_payment_id")),
            order_id=order_id if isinstance(order_id, str) and order_id else None,
            status=status,
            raw_status=raw_status,
            credit_usd=credit_for(body, status),
        )


@hookimpl
def register_payment_processors(register: RegisterPaymentProcessor) -> None:
    register("nowpayments", NowPaymentsProcessor)
