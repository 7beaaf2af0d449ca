"""An embeddings request through the core's steps: hold, call the routes, finish. The
adapter (router/embeddings.py) reads the request and writes the answer."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from apifast.catalog.toml import Model, Route
from apifast.metering.event import UsageEvent
from apifast.money import quantize_up
from apifast.providers import EmbeddingsRequest, EmbeddingsResponse, Provider, Usage
from apifast.router.billed_usage import count_bounds, sane_usage
from apifast.router.core import SETTLE_EARLY_SHARE, ensure_metering, new_generation_id
from apifast.router.finishing import event_receipt, finish, give_back
from apifast.router.holding import hold
from apifast.router.route_calls import RoutesFailed, call_routes, finish_failed, record_route
from apifast.router.state import RouterState


async def embed(
    state: RouterState,
    key_hash: bytes,
    model: Model,
    body: dict[str, Any],
    input_bound: int,
    started: float,
) -> tuple[EmbeddingsResponse, Decimal, str]:
    """Hold, call the routes and finish; returns the provider's answer, its cost and its
    signed receipt ("" when receipts are off)."""
    ensure_metering(state)
    generation_id = new_generation_id()
    bound = quantize_up(model.price.bound(input_bound, 0))
    holding = hold(state, key_hash, generation_id, bound, bound, model.id)
    held = await (holding if state.tracer is None else state.tracer.within("hold", holding))
    event = UsageEvent(
        generation_id=generation_id,
        key_hash=key_hash,
        key_id=held.key_id,
        model=model.id,
        endpoint="embeddings",
        stream=False,
        reserved_usd=held.reserved,
        started_at=started,
        lease=held.lease,
        settle_early=held.reserved * SETTLE_EARLY_SHARE > held.available,
    )

    async def call(provider: Provider, route: Route) -> EmbeddingsResponse:
        request = EmbeddingsRequest(body={**body, "model": route.model}, model=route.model)
        return await provider.embeddings(request)

    traced = call if state.tracer is None else state.tracer.upstream(model.routes, call)
    budget = state.routes.budget()
    try:
        result, entry = await call_routes(state, model, traced, budget)
    except RoutesFailed as failed:
        raise finish_failed(state, event, model, failed, budget) from None
    except BaseException:  # cancelled, or a provider's bug: the hold goes back now
        await give_back(state, generation_id, event.lease, event.reserved_usd)
        raise
    state.routes.release(entry)
    route = entry.route
    record_route(event, entry, budget)
    inputs = body.get("input")
    embedded = len(inputs) if isinstance(inputs, list) else 1  # a token array: fewer
    usage = sane_usage(result.usage, count_bounds(model.context_window, inputs=embedded))
    if usage is None:
        usage = Usage(input_tokens=input_bound)  # the hold's own bound
        event.usage_estimated = True
    result.usage = event.usage = usage
    event.ttft_ms = round((time.time() - started) * 1000)
    finish(state, event, model, route)
    receipt = state.receipts.sign(event_receipt(event)) if state.receipts is not None else ""
    return result, event.cost_usd, receipt
