"""Exact money: USD amounts are `Decimal`, stored as NUMERIC(30,12), never floats.

Prices are per million tokens with at most 6 decimal places, so a token count times a
price divided by 10**6 is exact at 12 decimal places.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Context, Decimal, InvalidOperation

USD_PLACES = 12
_QUANTUM = Decimal(1).scaleb(-USD_PLACES)
_CTX = Context(prec=40)
_MTOK = Decimal(1_000_000)
ZERO = Decimal(0)
# The largest amount accepted from outside: the NUMERIC(30, 12) columns (balances, ledger,
# thresholds) hold below 10**18, and this leaves room for sums of a few. Above it, a 400 at
# the door, not a database error (500) when the amount is stored.
MAX_USD = Decimal(10) ** 15
# What Decimal() is allowed to read: plain ASCII digits, an optional sign, fraction and
# exponent. Decimal() on its own also takes "1_000" (Python's digit grouping) and non-ASCII
# digits, so "0_5" meant to be 0.5 became a cap of 5.00.
_USD_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


# Why a JSON number with a fraction is refused as money, and what to send instead.
NO_FRACTION = (
    "must not be a number with a fraction (it would pass through a float): "
    'send a decimal string like "5.00"'
)


class MoneyError(ValueError):
    """A value that is not an exact, finite, non-negative USD amount."""


def parse_usd(value: object, *, field: str, max_places: int = USD_PLACES) -> Decimal:
    """Parse a price or amount given as a string, an int (a JSON integer is exact) or a
    Decimal. Floats are refused outright: a JSON number with a fraction has already been
    rounded to binary by the parser (orjson), so its digits cannot be trusted as money."""
    if isinstance(value, float):
        raise MoneyError(f"{field} {NO_FRACTION}")
    exact = isinstance(value, (str, int, Decimal)) and not isinstance(value, bool)
    text = str(value).strip() if exact else ""
    try:
        amount = Decimal(text) if _USD_TEXT.fullmatch(text) else None
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite():
        raise MoneyError(f'{field} must be an amount in USD: send a decimal string like "5.00"')
    if amount < 0:
        raise MoneyError(f"{field} must not be negative")
    if amount > MAX_USD:
        raise MoneyError(f"{field} is too large: at most {format_usd(MAX_USD)}")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > max_places:
        raise MoneyError(f"{field} has more than {max_places} decimal places")
    return amount


def per_mtok(tokens: int, usd_per_mtok: Decimal) -> Decimal:
    """Exact cost of `tokens` at a per-million-token price."""
    if not tokens or not usd_per_mtok:
        return ZERO
    return _CTX.divide(_CTX.multiply(Decimal(tokens), usd_per_mtok), _MTOK)


def units_to_usd(units: int) -> Decimal:
    """`units` of 10**-12 USD (the storage precision) as an exact amount."""
    return Decimal(units).scaleb(-USD_PLACES, _CTX) if units else ZERO


def quantize_up(amount: Decimal) -> Decimal:
    """Round up to storage precision (only estimates need it; exact costs already fit)."""
    return amount.quantize(_QUANTUM, rounding=ROUND_CEILING, context=_CTX)


def format_usd(amount: Decimal) -> str:
    """Exact decimal string, trailing zeros dropped past the cents: 5 -> "5.00"."""
    normalized = amount.normalize(_CTX)
    if normalized == 0:
        return "0.00"
    text = format(normalized, "f")
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0")
    if len(frac) < 2:
        frac = frac.ljust(2, "0")
    return f"{whole}.{frac}"


def json_number(amount: Decimal) -> str:
    """The same digits as `format_usd` minus padding, for writing as a raw JSON number."""
    normalized = amount.normalize(_CTX)
    if normalized == 0:
        return "0"
    return format(normalized, "f")
