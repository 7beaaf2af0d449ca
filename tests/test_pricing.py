"""Pricing is exact: the integer fast path of `Price.cost` and `Price.bound` gives the same
amounts as the per-million-token formula, term by term, for any catalog price."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from apifast.catalog.pricing import Price
from apifast.money import per_mtok
from apifast.providers import Usage

# What the catalog accepts: non-negative, at most 6 decimal places per million tokens.
prices = st.builds(
    lambda digits, places: Decimal(digits).scaleb(-places),
    st.integers(0, 10**12),
    st.integers(0, 6),
)
request_prices = st.builds(
    lambda digits, places: Decimal(digits).scaleb(-places),
    st.integers(0, 10**9),
    st.integers(0, 12),
)


def _reference_cost(p: Price, u: Usage) -> Decimal:
    cached = min(u.cached_tokens, u.input_tokens)
    written = min(u.cache_write_tokens, u.input_tokens - cached)
    plain = u.input_tokens - cached - written
    cached_price = p.input_usd_per_mtok if p.cached_input_usd_per_mtok is None else (
        p.cached_input_usd_per_mtok
    )  # fmt: skip
    write_price = p.input_usd_per_mtok if p.cache_write_usd_per_mtok is None else (
        p.cache_write_usd_per_mtok
    )  # fmt: skip
    return (
        per_mtok(plain, p.input_usd_per_mtok)
        + per_mtok(cached, cached_price)
        + per_mtok(written, write_price)
        + per_mtok(u.output_tokens, p.output_usd_per_mtok)
        + p.request_usd
    )


@given(
    st.builds(Price, prices, prices, st.none() | prices, st.none() | prices, request_prices),
    st.integers(0, 10**8),
    st.integers(0, 10**8),
    st.integers(0, 10**8),
    st.integers(0, 10**8),
)
def test_integer_pricing_equals_the_per_mtok_formula(
    price: Price, input_tokens: int, output_tokens: int, cached: int, written: int
) -> None:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                  cached_tokens=cached, cache_write_tokens=written)  # fmt: skip
    assert price.cost(usage) == _reference_cost(price, usage)
    reference_bound = (
        per_mtok(input_tokens, price.max_input_price())
        + per_mtok(output_tokens, price.output_usd_per_mtok)
        + price.request_usd
    )
    assert price.bound(input_tokens, output_tokens) == reference_bound


def test_a_price_finer_than_the_storage_unit_is_still_priced_exactly() -> None:
    # Not from the catalog (it refuses more than 6 places), but priced right all the same.
    price = Price(Decimal("0.0000001"), Decimal("1"))
    usage = Usage(input_tokens=3, output_tokens=2)
    assert price.cost(usage) == Decimal("0.0000000000003") + Decimal("0.000002")
    assert price.bound(3, 2) == price.cost(usage)
