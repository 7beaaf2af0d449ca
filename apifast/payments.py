"""The payment-processor contract: everything a processor plugin needs, and nothing of the router.

A processor plugin implements the `register_payment_processors` hook and registers a subclass
of `PaymentProcessor` under a name. At start-up the application calls `from_settings` on each
registered class; a class that returns None (not configured) is simply not offered.

A processor does three things: create a payment for an order (`create_payment`), turn a
webhook into a normalized `PaymentUpdate` after checking its signature (`verify_webhook`),
and read a payment's current state (`fetch_payment`). Crediting, deduplication and the
never-backwards status rule live in the core, so a processor only reports what it sees.

Amounts are `Decimal`, parsed from the processor's own digits; never convert them through a
float.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any, ClassVar

__all__ = [
    "CREDITING_STATUSES",
    "FINAL_STATUSES",
    "CreatedPayment",
    "PaymentError",
    "PaymentOption",
    "PaymentOrder",
    "PaymentProcessor",
    "PaymentStatus",
    "PaymentUpdate",
    "RegisterPaymentProcessor",
    "WebhookError",
    "WebhookPayloadError",
    "WebhookSignatureError",
    "get_header",
    "proportional_credit",
    "status_rank",
]


class PaymentStatus(enum.StrEnum):
    """The normalized payment statuses (NOWPayments' vocabulary, which covers BTCPay's)."""

    WAITING = "waiting"
    CONFIRMING = "confirming"
    CONFIRMED = "confirmed"
    SENDING = "sending"
    PARTIALLY_PAID = "partially_paid"
    FINISHED = "finished"
    FAILED = "failed"
    REFUNDED = "refunded"
    EXPIRED = "expired"


FINAL_STATUSES = frozenset(
    {
        PaymentStatus.PARTIALLY_PAID,
        PaymentStatus.FINISHED,
        PaymentStatus.FAILED,
        PaymentStatus.REFUNDED,
        PaymentStatus.EXPIRED,
    }
)
CREDITING_STATUSES = frozenset({PaymentStatus.PARTIALLY_PAID, PaymentStatus.FINISHED})

# A status may only move to a higher rank, so duplicate and out-of-order deliveries are
# harmless. Money that arrives late outranks giving up on it (expired -> finished credits),
# a full payment outranks a partial one, and a refund outranks everything (it closes).
_RANK = {
    PaymentStatus.WAITING: 0,
    PaymentStatus.CONFIRMING: 1,
    PaymentStatus.CONFIRMED: 2,
    PaymentStatus.SENDING: 3,
    PaymentStatus.EXPIRED: 4,
    PaymentStatus.FAILED: 4,
    PaymentStatus.PARTIALLY_PAID: 5,
    PaymentStatus.FINISHED: 6,
    PaymentStatus.REFUNDED: 7,
}


def status_rank(status: PaymentStatus | str) -> int:
    return _RANK[PaymentStatus(status)]


@dataclass(frozen=True, slots=True)
class PaymentOrder:
    """What a processor needs to create a payment for one order."""

    order_id: str
    amount_usd: Decimal
    pay_currency: str | None = None
    # Where the processor should send webhooks; None when APIFAST_PUBLIC_URL is unset (the
    # reconciliation task still finds the payment).
    callback_url: str | None = None
    description: str = "ApiFast credit"


@dataclass(frozen=True, slots=True)
class CreatedPayment:
    """What the buyer needs: an address, amount and coin, or a hosted invoice URL.

    `payment_id` is what `fetch_payment` reads. A hosted invoice whose payments only get ids
    once the buyer pays (NOWPayments' `POST /invoice`) leaves it None and sets `invoice_id`;
    the payments then arrive through webhooks that carry the order id.
    """

    payment_id: str | None
    invoice_id: str | None = None
    status: PaymentStatus = PaymentStatus.WAITING
    pay_address: str | None = None
    pay_amount: Decimal | None = None
    pay_currency: str | None = None
    # Extra routing data some coins need (a memo, tag or payment id), shown with the address.
    pay_extra_id: str | None = None
    payment_url: str | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PaymentUpdate:
    """One normalized observation of a processor payment.

    `credit_usd` is the USD value the processor says this payment is worth crediting at this
    status: the price when paid in full, the proportion that arrived when partially paid.
    None means the processor did not say (the core then fetches the payment when it needs
    the amount). `refetch` marks a webhook that is only a hint: the core then acts on
    `fetch_payment`'s answer instead (BTCPay's webhooks carry no amounts).
    """

    processor: str
    payment_id: str
    order_id: str | None
    status: PaymentStatus
    raw_status: str
    parent_payment_id: str | None = None
    credit_usd: Decimal | None = None
    refetch: bool = False


@dataclass(frozen=True, slots=True)
class PaymentOption:
    """One coin on offer. `min_amount_usd` None means only the global minimum applies."""

    coin: str
    min_amount_usd: Decimal | None = None


class PaymentError(Exception):
    """The processor could not be reached or refused a request. The message is for
    operators' logs; clients get a generic error."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class WebhookError(Exception):
    """A webhook that must change nothing."""


class WebhookSignatureError(WebhookError):
    """Missing or wrong signature: answer 401."""


class WebhookPayloadError(WebhookError):
    """Signed correctly but not a payload we can read: answer 400."""


def get_header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that works for plain dicts as well as Starlette's."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


_CREDIT_QUANTUM = Decimal(1).scaleb(-12)


def proportional_credit(price: Decimal, paid: Decimal, expected: Decimal) -> Decimal | None:
    """`price * paid / expected`, rounded down to storage precision and capped at `price`.

    Rounding down and capping mean a partial payment is never credited above what arrived.
    """
    if expected <= 0 or paid < 0 or price < 0:
        return None
    value = (price * paid / expected).quantize(_CREDIT_QUANTUM, rounding=ROUND_DOWN)
    return min(value, price)


class PaymentProcessor:
    """Base class for payment processors. Subclasses set `name` and implement the methods."""

    name: ClassVar[str] = ""
    # Shown to buyers in GET /v1/payments/options.
    display_name: ClassVar[str] = ""
    # True when the buyer pays on the processor's hosted page (no address in our response).
    hosted: ClassVar[bool] = False

    coins: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> PaymentProcessor | None:
        """An instance configured from `apifast.settings.Settings`, or None when the
        processor is not configured (and so is not offered)."""
        return None

    async def start(self) -> None:
        """Open HTTP clients; called once from the application's lifespan."""

    async def close(self) -> None:
        """Close what `start` opened."""

    async def options(self) -> list[PaymentOption]:
        """The coins on offer, with their minimum amounts when the processor has them."""
        return [PaymentOption(coin) for coin in self.coins]

    def accepts(self, pay_currency: str | None) -> bool:
        """Whether an order may ask for this coin (None: the buyer picks on a hosted page)."""
        if pay_currency is None:
            return self.hosted
        return pay_currency.lower() in self.coins

    async def create_payment(self, order: PaymentOrder) -> CreatedPayment:
        raise NotImplementedError

    def verify_webhook(self, headers: Mapping[str, str], raw_body: bytes) -> PaymentUpdate | None:
        """Check the signature over `raw_body` in constant time, then parse it.

        Raise `WebhookSignatureError` for a missing or wrong signature and
        `WebhookPayloadError` for a body that cannot be read. Return None for a genuine
        event that says nothing about a payment (a test ping, say).
        """
        raise NotImplementedError

    async def fetch_payment(self, payment_id: str) -> PaymentUpdate:
        """The payment's current state, straight from the processor."""
        raise NotImplementedError


# What the `register_payment_processors` hook is given: `register(name, ProcessorSubclass)`.
RegisterPaymentProcessor = Callable[[str, type[PaymentProcessor]], None]
