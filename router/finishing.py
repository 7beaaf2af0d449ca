"""How a held request ends, once: finished (its usage priced within the hold, its event
published, its tokens counted toward the key's tpm limit, its share of the lease freed or
its hold settled early) or, when it will not be finished, its hold given back. Also the
receipt of a finished request."""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal
from typing import Any

from apifast.catalog.toml import Model, Route
from apifast.metering.event import UsageEvent
from apifast.money import ZERO
from apifast.receipts import receipt_fields
from apifast.router.reservations import release
from apifast.router.state import RouterState
from apifast.router.traces import publish as traced_publish

log = logging.getLogger("apifast.router")


def price(event: UsageEvent, model: Model, route: Route | None) -> None:
    """Set the event's cost from its usage: never negative, never beyond its hold."""
    if route is not None:
        event.provider = route.provider
        event.upstream_model = route.model
        event.upstream_cost_usd = route.cost.cost(event.usage)
    used = event.usage.input_tokens or event.usage.output_tokens
    # A failed request with no usage costs nothing, not even the per-request price.
    if used or event.outcome != "upstream_error":
        cost = max(model.price.cost(event.usage), ZERO)
        # The buyer pays at most what was held, whatever the upstream reports; the excess
        # is the operator's (an upstream overage: counted by the meter, shown in /admin).
        event.cost_usd = min(cost, event.reserved_usd)
        event.overage_usd = cost - event.cost_usd


def finish(state: RouterState, event: UsageEvent, model: Model, route: Route | None) -> None:
    """Price the usage and mark the event finished; then (`_account`) hand it to the
    publisher, which never blocks, and count its tokens toward the key's tpm limit. Every
    request that took a hold ends here once."""
    price(event, model, route)
    if event.overage_usd:
        log.warning("model %s: usage beyond the hold by $%s", model.id, event.overage_usd)
    # At least 1: a finished event is told apart from an unfinished one by it (see generate).
    event.latency_ms = max(1, round((time.time() - event.started_at) * 1000))
    if state.tracer is None:
        # The rest needs nothing of the answer: it runs just after the loop step that
        # writes the answer out (the event is not changed after this), not before it.
        asyncio.get_running_loop().call_soon(_account, state, event, model)
    else:  # within the request's span
        traced_publish(state.tracer, event, model, route, state.publisher.submit)
        _account(state, event, model, publish=False)


def _account(state: RouterState, event: UsageEvent, model: Model, publish: bool = True) -> None:
    """A finished request's bookkeeping: publish its event, count its tokens toward the
    key's tpm limit, free its share of the lease or settle its hold early."""
    if publish:
        state.publisher.submit(event)
    state.key_limits.record_tokens(
        event.key_id, event.usage.input_tokens + event.usage.output_tokens
    )
    if state.metrics is not None:
        # An embeddings event carries api "chat" (its stored rows and receipts say so); the
        # metrics name the protocol the client spoke.
        api = "embeddings" if event.endpoint == "embeddings" else event.api
        state.metrics.finished(
            model.id, api, event.status, event.started_at, event.ttft_ms,
            event.usage.input_tokens, event.usage.output_tokens, event.cost_usd,
        )  # fmt: skip
    if event.lease:
        assert state.leases is not None
        state.leases.finish(event.lease, event.reserved_usd, event.cost_usd)
    elif event.settle_early and event.cost_usd < event.reserved_usd:
        state.settler.submit(event.generation_id, event.key_hash, event.cost_usd)


async def give_back(state: RouterState, generation_id: str, lease: str, amount: Decimal) -> None:
    """Return the hold of a request that will not be finished (refused, cancelled, failed
    unexpectedly): to its lease in memory, or its own row in Postgres."""
    if lease:
        assert state.leases is not None
        state.leases.finish(lease, amount, ZERO)
        return
    try:
        await release(state.pool, generation_id)
    except Exception as exc:  # the TTL releases it then
        log.warning("releasing hold %s failed: %s", generation_id, type(exc).__name__)


def event_receipt(event: UsageEvent) -> dict[str, Any]:
    """The receipt's fields for a finished request (as GET /v1/generation/{id} gives them
    from the stored row, to the byte)."""
    u = event.usage
    return receipt_fields(
        generation_id=event.generation_id, model=event.model, api=event.api,
        input_tokens=u.input_tokens, output_tokens=u.output_tokens,
        cached_tokens=u.cached_tokens, cost_usd=event.cost_usd,
        ts_ms=round(event.started_at * 1000), key_hash_hex=event.key_hash.hex(),
    )  # fmt: skip
