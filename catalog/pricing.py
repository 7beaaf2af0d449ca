"""Prices a model's usage exactly, and bounds the cost of a request before it is sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from apifast.money import USD_PLACES, ZERO, per_mtok, units_to_usd
from apifast.providers import Usage


def _units_per_token(usd_per_mtok: Decimal) -> int | None:
    """The price of one token in units of 10**-12 USD, when it is a whole number of them
    (always, for prices of at most 6 decimal places, as the catalog takes them)."""
    units = usd_per_mtok.scaleb(USD_PLACES - 6)
    return int(units) if units == units.to_integral_value() else None


@dataclass(frozen=True, slots=True)
class Price:
    input_usd_per_mtok: Decimal = ZERO
    output_usd_per_mtok: Decimal = ZERO
    cached_input_usd_per_mtok: Decimal | None = None  # None: same as input
    cache_write_usd_per_mtok: Decimal | None = None  # None: same as input
    request_usd: Decimal = ZERO
    # (input, cached, cache write, output, the dearest input) per token in 10**-12 USD: every
    # request is priced and bounded with integer products and one conversion, not Decimal
    # divisions.
    _units: tuple[int, int, int, int, int] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        cached = self.cached_input_usd_per_mtok
        write = self.cache_write_usd_per_mtok
        prices = (
            self.input_usd_per_mtok,
            self.input_usd_per_mtok if cached is None else cached,
            self.input_usd_per_mtok if write is None else write,
            self.output_usd_per_mtok,
        )
        units = [_units_per_token(p) for p in prices]
        if all(u is not None for u in units):
            whole = [u for u in units if u is not None]
            object.__setattr__(self, "_units", (*whole, max(whole[:3])))

    def cost(self, usage: Usage) -> Decimal:
        cached = min(usage.cached_tokens, usage.input_tokens)
        written = min(usage.cache_write_tokens, usage.input_tokens - cached)
        plain = usage.input_tokens - cached - written
        units = self._units
        if units is not None:
            total = (
                plain * units[0]
                + cached * units[1]
                + written * units[2]
                + usage.output_tokens * units[3]
            )
            return units_to_usd(total) + self.request_usd
        cached_price = (
            self.input_usd_per_mtok
            if self.cached_input_usd_per_mtok is None
            else self.cached_input_usd_per_mtok
        )
        write_price = (
            self.input_usd_per_mtok
            if self.cache_write_usd_per_mtok is None
            else self.cache_write_usd_per_mtok
        )
        return (
            per_mtok(plain, self.input_usd_per_mtok)
            + per_mtok(cached, cached_price)
            + per_mtok(written, write_price)
            + per_mtok(usage.output_tokens, self.output_usd_per_mtok)
            + self.request_usd
        )

    def max_input_price(self) -> Decimal:
        """The dearest way an input token can be billed (cache writes may cost more)."""
        return max(
            self.input_usd_per_mtok,
            self.cache_write_usd_per_mtok or ZERO,
            self.cached_input_usd_per_mtok or ZERO,
        )

    def bound(self, input_tokens: int, output_tokens: int) -> Decimal:
        """An upper bound of the cost of a request with at most these token counts."""
        units = self._units
        if units is not None:
            total = input_tokens * units[4] + output_tokens * units[3]
            return units_to_usd(total) + self.request_usd
        return (
            per_mtok(input_tokens, self.max_input_price())
            + per_mtok(output_tokens, self.output_usd_per_mtok)
            + self.request_usd
        )

    def affordable_output_tokens(self, budget: Decimal, input_tokens: int) -> int:
        """How many output tokens `budget` covers after the input bound is paid."""
        left = budget - self.bound(input_tokens, 0)
        if left < 0:
            return 0
        if not self.output_usd_per_mtok:
            return 1 << 30
        return int(left * 1_000_000 / self.output_usd_per_mtok)
