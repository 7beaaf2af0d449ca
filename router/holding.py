"""Taking a request's hold: from this router's balance lease on the key when it covers the
request (router/leases.py), else its own row in Postgres (router/reservations.py), waiting a
while on balance that only holds in flight keep; then the key's rate limits. A hold ends in
router/finishing.py: finished, or given back."""

from __future__ import annotations

import time
from decimal import Decimal

from apifast.errors import ApiError
from apifast.router.finishing import give_back
from apifast.router.reservations import (
    DATABASE_DOWN,
    BalanceHeldUp,
    Hold,
    Refused,
    rate_limited,
    reserve,
)
from apifast.router.state import RouterState


async def hold(
    state: RouterState,
    key_hash: bytes,
    generation_id: str,
    min_usd: Decimal,
    max_usd: Decimal,
    model: str = "",
    limits: bool = True,
) -> Hold:
    """Hold money on the key, then apply its rate limits. From this router's balance lease
    on the key when it covers the request (memory only); else in Postgres, which also
    authenticates the key and checks a sub-key's caps, expiry and allowed models (`model`,
    the public id) before any upstream call (router/leases.py; a sub-key is never leased).

    `limits` False: a fallback model's hold, for a client request whose first hold already
    counted it. One client request counts once toward rpm (here and in Postgres's window)
    and is checked once against tpm; the tokens it used count at `finish`, from the one
    event billed. A fallback hold is neither counted nor refused for the key's limits."""
    leases = state.leases
    held = leases.take(key_hash, max_usd) if leases is not None else None
    if held is None:
        try:
            held = await _hold_in_postgres(
                state, key_hash, generation_id, min_usd, max_usd, model, limits
            )
        except ApiError as refused:
            if state.metrics is not None:
                state.metrics.hold_refusals.labels(refused.code or str(refused.status)).inc()
            raise
        if leases is not None:
            leases.consider(key_hash, held, max_usd)
    if not limits:
        return held
    wait = _limits_wait(state, held)
    if wait:
        await give_back(state, generation_id, held.lease, held.reserved)
        if state.metrics is not None:
            state.metrics.hold_refusals.labels("rate_limit_exceeded").inc()
        raise rate_limited(wait)
    return held


def _limits_wait(state: RouterState, held: Hold) -> float:
    """This router's own windows: 0 when the request may go (and counts it). A sub-key's
    request counts in its parent's window too, whose limits (the parent's own, else the
    defaults) are the total of the key and its sub-keys; its tokens are checked there."""
    limits, settings = state.key_limits, state.settings
    rpm = held.rpm_limit or settings.default_rpm_limit
    tpm = held.tpm_limit or settings.default_tpm_limit
    if held.parent_id is None:
        return limits.check_request(held.key_id, rpm) or limits.check_tokens(held.key_id, tpm)
    parent_rpm = held.parent_rpm_limit or settings.default_rpm_limit
    return limits.check_sub_key_request(
        held.key_id, rpm, held.parent_id, parent_rpm
    ) or limits.check_tokens(held.parent_id, tpm)


async def _hold_in_postgres(
    state: RouterState,
    key_hash: bytes,
    generation_id: str,
    min_usd: Decimal,
    max_usd: Decimal,
    model: str,
    count: bool = True,
) -> Hold:
    """The request's own hold. When only holds in flight stand in the way, wait up to
    settings.hold_wait_s for them to settle (each settled batch wakes the wait; other
    routers' settles are polled for). This router's own lease on the key is given back
    first when the balance it holds is what is missing."""
    deadline = time.monotonic() + state.settings.hold_wait_s
    while True:
        try:
            return await _reserve(state, key_hash, generation_id, min_usd, max_usd, model, count)
        except ApiError as refused:
            if refused.status not in (402, 429):
                raise
            parent = refused.parent_id if isinstance(refused, Refused) else None
            if state.leases is not None and await _surrender(state, key_hash, parent):
                continue
            left = deadline - time.monotonic()
            if not isinstance(refused, BalanceHeldUp) or left <= 0:
                raise
            await state.settler.wait(min(left, _HOLD_POLL_S))


async def _surrender(state: RouterState, key_hash: bytes, parent_id: int | None) -> bool:
    """Give back this router's lease on the key (or, for a sub-key, on its parent)."""
    assert state.leases is not None
    try:
        if parent_id is not None:
            return await state.leases.surrender_key(parent_id)
        return await state.leases.surrender(key_hash)
    except DATABASE_DOWN:
        return False


_HOLD_POLL_S = 0.1  # how often a waiting request re-tries without a local settle


async def _reserve(
    state: RouterState,
    key_hash: bytes,
    generation_id: str,
    min_usd: Decimal,
    max_usd: Decimal,
    model: str,
    count: bool = True,
) -> Hold:
    if state.reserver is not None:
        return await state.reserver.reserve(key_hash, generation_id, min_usd, max_usd, model, count)
    s = state.settings
    return await reserve(
        state.pool, key_hash, generation_id, min_usd, max_usd, s.reservation_ttl_s,
        s.default_rpm_limit, s.default_tpm_limit, model, count,
    )  # fmt: skip
