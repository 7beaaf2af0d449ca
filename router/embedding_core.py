"""An embeddings request through the core's steps: hold, call the routes, finish; with the
client's `models` / `route` (router/route_prefs.py), the same fallback across models as chat
(router/model_fallback.py), each model held and billed at its own price. The adapter
(router/embeddings.py) reads the request and writes the answer."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from apifast.catalog.toml import Model, Route
from apifast.metering.event import UsageEvent
from apifast.money import quantize_up
from apifast.providers import EmbeddingsRequest, EmbeddingsResponse, Provider, Usage
from apifast.router.billed_usage import count_bounds, sane_usage
from apifast.router.core import SETTLE_EARLY_SHARE, ensure_metering, new_generation_id
from apifast.router.finishing import event_receipt, finish, give_back
from apifast.router.holding import hold
from apifast.router.model_fallback import NextModel, across_models, routes_failed
from apifast.router.route_book import Budget
from apifast.router.route_calls import RoutesFailed, call_routes, record_route
from apifast.router.state import RouterState

if TYPE_CHECKING:
    from apifast.router.route_prefs import Choice


class Embedded:
    """What an answered embeddings request gives its adapter."""

    __slots__ = ("cost", "model", "receipt", "result")

    def __init__(
        self, model: Model, result: EmbeddingsResponse, cost: Decimal, receipt: str
    ) -> None:
        self.model = model  # the public model that answered
        self.result = result
        self.cost = cost
        self.receipt = receipt  # signed, "" when receipts are off


async def embed(
    state: RouterState,
    key_hash: bytes,
    model: Model,
    body: dict[str, Any],
    input_bound: int,
    started: float,
    choice: Choice | None = None,
) -> Embedded:
    """Hold, call the routes and finish; with a `choice`, its models in turn until one
    answers or fails for good (router/model_fallback.py)."""
    ensure_metering(state)
    if choice is None:
        budget = state.routes.budget()
        return await _embed_one(state, key_hash, model, body, input_bound, started, budget)
    shared = choice.budget(state.routes)

    async def attempt(i: int, candidate: Model, more: bool, limits: bool) -> Embedded:
        return await _embed_one(
            state, key_hash, candidate, body, input_bound, started, shared,
            choice.strategy, more, limits,
        )  # fmt: skip

    return await across_models(choice, attempt)


async def _embed_one(
    state: RouterState,
    key_hash: bytes,
    model: Model,
    body: dict[str, Any],
    input_bound: int,
    started: float,
    budget: Budget,
    strategy: str | None = None,
    more: bool = False,
    limits: bool = True,
) -> Embedded:
    generation_id = new_generation_id()
    bound = quantize_up(model.price.bound(input_bound, 0))
    holding = hold(state, key_hash, generation_id, bound, bound, model.id, limits=limits)
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
    try:
        result, entry = await call_routes(state, model, traced, budget, strategy)
    except RoutesFailed as failed:
        error = routes_failed(state, event, model, failed, budget, more)
        if isinstance(error, NextModel):  # the next model is tried with its own hold
            await give_back(state, generation_id, event.lease, event.reserved_usd)
        raise error from None
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
    return Embedded(model, result, event.cost_usd, receipt)
