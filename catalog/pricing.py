"""Prices a model's usage exactly, and bounds the cost of a request before it is sent."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from apifast.money import ZERO, per_mtok
from apifast.providers import Usage


@dataclass(frozen=True, slots=True)
class Price:
    input_usd_per_mtok: Decimal = ZERO
    output_usd_per_mtok: Decimal = ZERO
    cached_input_usd_per_mtok: Decimal | None = None  # None: same as input
    cache_write_usd_per_mtok: Decimal | None = None  # None: same as input
    request_usd: Decimal = ZERO

    def cost(self, usage: Usage) -> Decimal:
        cached = min(usage.cached_tokens, usage.input_tokens)
        written = min(usage.cache_write_tokens, usage.input_tokens - cached)
        plain = usage.input_tokens - cached - written
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
