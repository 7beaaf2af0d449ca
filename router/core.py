"""The request core every client protocol shares, as named steps:

    authenticate -> parse -> resolve model(s) -> hold -> call routes (with fallback) -> relay
    -> finish (price, record limits, publish)

Routes are tried in the order `router/route_book.py` gives (the model's strategy, or the
client's `route.sort`), skipping open breakers and benched routes, within the request's
attempt budget and only before the first byte reaches the client. With the client's
`models`, a model whose routes all failed that way gives its hold back and the next model is
tried with its own hold, at its own price; so is a model whose hold the balance refuses.

A protocol adapter (chat completions, embeddings, and the translating ones) reads its own
request shape, turns it into a `Generation` (a chat-completions body for the providers, the
bounds that size the hold), and gives the core a `Renderer` that writes the provider's
answer back in the adapter's shape. Everything that touches money is in the core, once.

This module holds the steps before the hold and the orchestration: `generate` (each of the
client's models in turn, one model's hold and the non-streaming completion). The other steps
have a module each:

- `core_types.py`: what adapters hand the core (`Generation`, `Renderer`) and get (`Reply`);
- `route_fit.py`: before the hold, which routes can express the request (else a 400);
- `holding.py`: the hold (this router's lease, else Postgres) and the key's rate limits;
- `route_calls.py`: calling a model's routes in order, and the client's error when they fail;
- `streaming.py`: relaying a stream, with its keep-alives and usage checkpoints;
- `billed_usage.py`: the usage billed, the upstream's when sane, else the documented estimate;
- `finishing.py`: a held request's end, priced and published once, or its hold given back;
- `model_fallback.py`: the loop over the client's `models`, shared with embeddings;
- `embedding_core.py`: an embeddings request, through the same steps.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apifast.auth import key_hash_from_header
from apifast.catalog.toml import Model, Route
from apifast.errors import ApiError
from apifast.metering.event import UsageEvent
from apifast.money import quantize_up
from apifast.providers import ChatRequest, NativeRequest, Provider
from apifast.router.billed_usage import (
    completion_chars,
    count_bounds,
    estimate_delivered,
    sane_usage,
)
from apifast.router.core_types import Generation, NativeRenderer, Renderer, Reply, speaks_native
from apifast.router.finishing import event_receipt, finish, give_back
from apifast.router.holding import hold
from apifast.router.media import media_token_bound
from apifast.router.model_fallback import across_models, routes_failed
from apifast.router.route_book import Budget
from apifast.router.route_calls import RoutesFailed, call_routes, record_route
from apifast.router.route_fit import unfit_providers
from apifast.router.state import RouterState
from apifast.router.streaming import relay_stream

if TYPE_CHECKING:
    from apifast.router.route_prefs import Choice


LOWERED_HEADER = "X-ApiFast-Max-Tokens-Lowered"
RECEIPT_HEADER = "X-ApiFast-Receipt"
# A hold above 1/SETTLE_EARLY_SHARE of the balance available when it was taken can block the
# key's other requests, so it is settled to its exact cost as soon as the request ends. The
# rest wait for the meter's debit (within its batch wait): settling every hold costs a row
# lock on the key between two of its requests (measured: +5 ms p50 at one connection).
SETTLE_EARLY_SHARE = 8


# --- steps ---------------------------------------------------------------------------------


def authenticate(state: RouterState, header: str | None) -> bytes:
    """The key's hash from `Authorization: Bearer ...`; the key itself is checked by the hold."""
    return key_hash_from_header(header, state.secret)


def new_generation_id() -> str:
    return "gen-" + os.urandom(12).hex()


def resolve(state: RouterState, model_id: str, kind: str, param: str = "model") -> Model:
    """The public model `model_id` for an endpoint serving `kind`; else a 404 (unknown) or
    400 (another kind), naming `param`, the field that named it (`models[1]`)."""
    model = state.catalog.get(model_id)
    if model is None:
        named = "" if param == "model" else f"{param}: "
        raise ApiError(
            404,
            f"{named}The model '{model_id}' does not exist. GET /v1/models lists the models "
            "on offer.",
            param=param,
            code="model_not_found",
        )
    if model.kind != kind:
        raise ApiError(
            400,
            f"{param}: '{model_id}' is a {model.kind} model and cannot serve this endpoint",
            param=param,
            code="wrong_model_type",
        )
    return model


def ensure_metering(state: RouterState) -> None:
    if not state.publisher.accepting:
        raise ApiError(
            503,
            "Usage metering is backed up; paid requests are paused. Retry shortly.",
            code="metering_unavailable",
            headers={"Retry-After": "5"},
        )


# --- chat generations (chat completions and the protocols translated to it) ----------------


async def generate(
    state: RouterState,
    key_hash: bytes,
    model: Model,
    gen: Generation,
    renderer: Renderer,
    started: float,
    choice: Choice | None = None,
) -> Reply:
    """Hold, call the routes and relay the answer through `renderer`; raises ApiError.
    With a `choice` (the client's `models` / `route`), its models in turn, each with its
    own hold, until one answers or fails for good. A model the balance cannot hold (402:
    pricier than what is left, or a sub-key's cap), a sub-key may not use (403) or no route
    of which can express the request (400) is passed over for the next; when no model could
    be held, the client gets the last held model's failure, else the 402, else the 403,
    else the 400."""
    ensure_metering(state)
    generation_id = renderer.generation_id = new_generation_id()
    if choice is None:
        return await _generate_one(
            state, key_hash, model, gen, renderer, started, generation_id, state.routes.budget()
        )
    budget = choice.budget(state.routes)
    bound, size = gen.input_bound, gen.input_bytes

    async def attempt(i: int, candidate: Model, more: bool, limits: bool) -> Reply:
        nonlocal generation_id
        renderer.model = candidate.id
        if i:
            # Its own hold under its own id: the previous model's hold may not be gone yet
            # (its release failed: the TTL frees it). Nothing was rendered under the old id.
            generation_id = renderer.generation_id = new_generation_id()
        gen.input_bound, gen.input_bytes = bound, size
        return await _generate_one(
            state, key_hash, candidate, gen, renderer, started, generation_id, budget,
            choice.strategy, more, limits=limits,
        )  # fmt: skip

    return await across_models(choice, attempt)


async def _generate_one(
    state: RouterState,
    key_hash: bytes,
    model: Model,
    gen: Generation,
    renderer: Renderer,
    started: float,
    generation_id: str,
    budget: Budget,
    strategy: str | None = None,
    more: bool = False,
    limits: bool = True,
) -> Reply:
    # Before the hold: a field no route of the model can express is a 400, not billed.
    skip = unfit_providers(state, model, gen)
    gen.input_bound += media_token_bound(model, gen.body.get("messages"))
    # The estimate for missing usage (body bytes / 4) stays within the hold's input bound.
    gen.input_bytes = min(gen.input_bytes, 4 * gen.input_bound)
    cap = gen.max_output or model.max_output_tokens or state.settings.default_max_output_tokens
    if model.max_output_tokens:
        cap = min(cap, model.max_output_tokens)
    price, n = model.price, gen.n
    max_usd = quantize_up(price.bound(gen.input_bound, cap * n))
    min_usd = quantize_up(price.bound(gen.input_bound, n))
    holding = hold(state, key_hash, generation_id, min_usd, max_usd, model.id, limits=limits)
    held = await (holding if state.tracer is None else state.tracer.within("hold", holding))

    headers: dict[str, str] = {}
    out_tokens = cap
    if held.reserved < max_usd:
        # The balance covers a shorter answer: lower max_tokens instead of refusing.
        affordable = price.affordable_output_tokens(held.reserved, gen.input_bound) // n
        out_tokens = max(1, min(cap, affordable))
        headers[LOWERED_HEADER] = str(out_tokens)
    ubody = gen.body
    # Always bound the output upstream, so the hold covers the whole answer; in one field:
    # an upstream reading the other one (or OpenAI, which refuses both) must not get the
    # client's own value beside the hold's.
    if "max_completion_tokens" in ubody:
        ubody["max_completion_tokens"] = out_tokens
        ubody.pop("max_tokens", None)
    else:
        ubody["max_tokens"] = out_tokens
    if gen.native is not None:
        if out_tokens < gen.native_min and not gen.native_only:
            gen.native = None  # every route translates: the native API would refuse the bound
        else:
            gen.native[gen.native_bound] = out_tokens
    event = UsageEvent(
        generation_id=generation_id,
        key_hash=key_hash,
        key_id=held.key_id,
        model=model.id,
        endpoint=gen.endpoint,
        stream=gen.stream,
        reserved_usd=held.reserved,
        started_at=started,
        api=gen.api,
        lease=held.lease,
        settle_early=held.reserved * SETTLE_EARLY_SHARE > held.available,
    )
    routing = Routing(budget, strategy, more, skip)
    try:
        if gen.stream:
            return await relay_stream(
                state, model, ubody, event, gen, renderer, headers, out_tokens * n, routing
            )
        return await _complete(state, model, ubody, event, gen, renderer, headers, routing)
    except BaseException:
        # Anything unexpected before the request was finished (a provider's serialisation
        # failing on what the client sent, a cancelled request): give the hold back now,
        # not at its TTL. A finished request is the meter's to settle.
        if not event.latency_ms:
            await give_back(state, generation_id, event.lease, event.reserved_usd)
        raise


@dataclass(slots=True)
class Routing:
    budget: Budget
    strategy: str | None  # the client's route.sort, as a strategy; None: the model's
    more: bool  # another of the client's models may follow this one
    skip: frozenset[str]  # providers that cannot express this request (route_fit.py)

    def fail(
        self, state: RouterState, event: UsageEvent, model: Model, failed: RoutesFailed
    ) -> BaseException:
        return routes_failed(state, event, model, failed, self.budget, self.more)


async def _complete(
    state: RouterState,
    model: Model,
    ubody: dict[str, Any],
    event: UsageEvent,
    gen: Generation,
    renderer: Renderer,
    headers: dict[str, str],
    routing: Routing,
) -> Reply:
    native = [False]

    async def call(provider: Provider, route: Route) -> Any:
        if speaks_native(provider, gen):
            native[0] = True
            body = {**(gen.native or {}), "model": route.model}
            return await provider.native(NativeRequest(gen.api, body, route.model))
        native[0] = False
        return await provider.chat(
            ChatRequest(body={**ubody, "model": route.model}, model=route.model)
        )

    traced = call if state.tracer is None else state.tracer.upstream(model.routes, call)
    called = time.perf_counter()
    clocked = state.routes.clock()  # the route book's clock (injectable), for its EWMAs
    try:
        result, entry = await call_routes(
            state, model, traced, routing.budget, routing.strategy, routing.skip
        )
    except RoutesFailed as failed:
        raise routing.fail(state, event, model, failed) from None
    upstream_s = time.perf_counter() - called
    route = entry.route
    record_route(event, entry, routing.budget)
    relay: NativeRenderer | None = renderer if native[0] else None  # type: ignore[assignment]
    usage = sane_usage(result.usage, count_bounds(model.context_window, gen.n))
    if usage is None:
        # No usage, or counts not to believe: the documented estimate instead, as for a
        # stream, capped at the output sent upstream (x n) so that it stays within the hold.
        max_output = (ubody.get("max_completion_tokens") or ubody.get("max_tokens") or 1) * gen.n
        chars = relay.native_chars(result.body) if relay else completion_chars(result.body)
        usage = estimate_delivered(gen.input_bytes, chars, 1, max_output)
        event.usage_estimated = True
    result.usage = event.usage = usage
    event.ttft_ms = round((time.time() - event.started_at) * 1000)
    state.routes.release(entry, usage.output_tokens, state.routes.clock() - clocked)
    finish(state, event, model, route)
    if relay is not None:
        body = relay.native_completion(result.body, usage, event.cost_usd)
    else:
        body = renderer.completion(result.body, usage, event.cost_usd)
    if state.receipts is not None:
        headers[RECEIPT_HEADER] = state.receipts.sign(event_receipt(event))
    if state.metrics is not None:
        total = time.time() - event.started_at
        state.metrics.overhead.labels(gen.api).observe(max(0.0, total - upstream_s))
    return Reply(headers, body)
