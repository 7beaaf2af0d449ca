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
answer back in the adapter's shape. Everything that touches money is here, once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from apifast.auth import key_hash_from_header
from apifast.catalog.toml import Model, Route
from apifast.errors import ApiError
from apifast.metering.event import UsageEvent
from apifast.money import ZERO, quantize_up
from apifast.providers import (
    ChatRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    NativeRequest,
    Provider,
    StreamItem,
    UpstreamError,
    UpstreamTimeout,
    Usage,
)
from apifast.receipts import receipt_fields
from apifast.router.media import media_token_bound
from apifast.router.prompt_bound import prompt_token_bound
from apifast.router.relay import Waiting, close_quietly, next_step
from apifast.router.reservations import (
    DATABASE_DOWN,
    BalanceHeldUp,
    Hold,
    Refused,
    rate_limited,
    release,
    reserve,
)
from apifast.router.route_book import Budget
from apifast.router.route_choice import RouteEntry
from apifast.router.state import RouterState
from apifast.router.traces import publish as traced_publish

if TYPE_CHECKING:
    from apifast.router.route_prefs import Choice

log = logging.getLogger("apifast.router")
T = TypeVar("T")

LOWERED_HEADER = "X-ApiFast-Max-Tokens-Lowered"
RECEIPT_HEADER = "X-ApiFast-Receipt"
# A hold above 1/SETTLE_EARLY_SHARE of the balance available when it was taken can block the
# key's other requests, so it is settled to its exact cost as soon as the request ends. The
# rest wait for the meter's debit (within its batch wait): settling every hold costs a row
# lock on the key between two of its requests (measured: +5 ms p50 at one connection).
SETTLE_EARLY_SHARE = 8
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- what adapters hand the core, and what it hands back ---------------------------------


@dataclass(slots=True)
class Generation:
    """A chat generation as the providers speak it (OpenAI chat completions), plus what the
    adapter learnt while reading the client's request."""

    body: dict[str, Any]  # validated; caller-identifying fields already stripped
    stream: bool
    input_bound: int  # an upper bound of prompt tokens (router/prompt_bound.py)
    max_output: int | None  # what the client asked for, if anything
    n: int = 1
    endpoint: str = "chat"  # the usage event's endpoint label
    api: str = "chat"  # the client protocol: chat | messages | responses
    input_bytes: int = 0  # the client's body size, for the estimate when usage is missing
    # The client's own body (cleaned), for a route whose provider speaks `api` natively:
    # it then passes through untranslated, and the renderer's native_* methods write it.
    native: dict[str, Any] | None = None

    @classmethod
    def translated(
        cls, chat: dict[str, Any], api: str, input_bytes: int,
        native: dict[str, Any] | None = None,
    ) -> Generation:  # fmt: skip
        """A generation read from another protocol's request (`chat` is its translation)."""
        return cls(
            body=chat,
            stream=bool(chat.get("stream")),
            input_bound=prompt_token_bound(chat),
            max_output=chat.get("max_tokens"),
            api=api,
            input_bytes=input_bytes,
            native=native,
        )


class Renderer(Protocol):
    """Writes the provider's (OpenAI-shaped) answer in one client protocol's shape. One
    instance per request, so a streaming renderer may keep state between chunks. The core
    sets `generation_id` (ApiFast's own id for the request) before rendering anything."""

    generation_id: str
    model: str  # the public model answering (the core sets it for each of `models`)

    def completion(self, upstream: dict[str, Any], usage: Usage, cost: Decimal) -> bytes: ...

    def chunk(self, chunk: dict[str, Any]) -> bytes: ...

    def stream_end(self, usage: Usage, cost: Decimal) -> bytes: ...

    def stream_error(self, status: int) -> bytes: ...

    # A renderer may also have `keepalive` (bytes, b"" for none yet): its protocol's
    # keep-alive event, sent after settings.stream_ping_s without upstream data.


class NativeRenderer(Renderer, Protocol):
    """A renderer that can also relay its protocol's own answer from a native route."""

    def native_completion(self, upstream: dict[str, Any], usage: Usage, cost: Decimal) -> bytes: ...

    def native_chunk(self, event: dict[str, Any]) -> bytes: ...

    def native_chars(self, item: dict[str, Any]) -> int: ...


def _speaks(provider: Provider, gen: Generation) -> bool:
    return gen.native is not None and gen.api in provider.native_protocols


async def _resolved(waiting: Waiting) -> tuple[bool, Any]:
    """(True, item) when the step produced one, (False, None) at the stream's end."""
    try:
        return True, await waiting
    except StopAsyncIteration:
        return False, None


@dataclass(slots=True)
class Reply:
    """A 200 answer: a JSON body, or an SSE stream (`stream` is set). Iterating `stream` to
    its end or closing it settles the request; `finished` is set before its last piece."""

    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    finished: bool = False


# --- steps ---------------------------------------------------------------------------------


def authenticate(state: RouterState, header: str | None) -> bytes:
    """The key's hash from `Authorization: Bearer ...`; the key itself is checked by the hold."""
    return key_hash_from_header(header, state.secret)


def new_generation_id() -> str:
    return "gen-" + os.urandom(12).hex()


def resolve(state: RouterState, model_id: str, kind: str) -> Model:
    model = state.catalog.get(model_id)
    if model is None:
        raise ApiError(
            404,
            f"The model '{model_id}' does not exist. GET /v1/models lists the models on offer.",
            param="model",
            code="model_not_found",
        )
    if model.kind != kind:
        raise ApiError(
            400,
            f"model: '{model_id}' is a {model.kind} model and cannot serve this endpoint",
            param="model",
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
    settings = state.settings
    wait = state.key_limits.check_request(
        held.key_id, held.rpm_limit or settings.default_rpm_limit
    ) or state.key_limits.check_tokens(held.key_id, held.tpm_limit or settings.default_tpm_limit)
    if wait:
        await give_back(state, generation_id, held.lease, held.reserved)
        if state.metrics is not None:
            state.metrics.hold_refusals.labels("rate_limit_exceeded").inc()
        raise rate_limited(wait)
    return held


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


class RoutesFailed(Exception):
    def __init__(
        self, last: UpstreamError | None, entry: RouteEntry | None, unavailable_s: int = 0
    ) -> None:
        super().__init__("all routes failed")
        self.last = last
        self.entry = entry  # the last route attempted
        self.unavailable_s = unavailable_s  # >0: no route was admitted; retry after this

    @property
    def route(self) -> Route | None:
        return self.entry.route if self.entry is not None else None

    @property
    def retryable(self) -> bool:
        """Another model may be tried: nothing failed for a reason of the request's own."""
        return self.last is None or self.last.retryable


async def call_routes(
    state: RouterState,
    model: Model,
    call: Callable[[Provider, Route], Awaitable[T]],
    budget: Budget | None = None,
    strategy: str | None = None,
) -> tuple[T, RouteEntry]:
    """Call the routes in this request's order until one answers; fall back only on
    retryable errors, within `budget`. The answering route stays counted as in flight until
    `state.routes.release` (the caller's, once the answer is relayed)."""
    book = state.routes
    if budget is None:
        budget = book.budget()
    last: UpstreamError | None = None
    tried: RouteEntry | None = None
    skipped: list[RouteEntry] = []
    providers = state.providers
    for entry in book.order(model, strategy):
        route = entry.route
        provider = providers.get(route.provider)
        if provider is None:
            continue
        clock = book.clock
        if budget.spent(clock()):
            break
        if not book.admit(entry):
            skipped.append(entry)
            continue
        budget.used += 1
        tried = entry
        begun = clock()
        try:
            result = await call(provider, route)
        except UpstreamError as exc:
            book.failed(model.id, entry, exc)
            last = exc
            # Status only: upstream error bodies may echo the prompt.
            log.warning(
                "model %s route %d (%s) failed: status=%s cause=%s %s",
                model.id, entry.index, route.provider, exc.status, exc.cause,
                type(exc).__name__,
            )  # fmt: skip
            if state.metrics is not None:
                state.metrics.upstream_errors.labels(model.id, route.provider, exc.cause).inc()
            if not exc.retryable:
                break
            continue
        except BaseException:
            book.abandoned(entry)
            raise
        book.succeeded(model.id, entry, clock() - begun)
        return result, entry
    wait = book.wait_s(skipped) if last is None and skipped else 0
    raise RoutesFailed(last, tried, wait)


def upstream_failure(exc: UpstreamError | None, unavailable_s: int = 0) -> ApiError:
    """What the client learns of an upstream failure: a status, never the upstream's text."""
    if exc is None and unavailable_s:
        return ApiError(
            503,
            "The model is temporarily unavailable; retry shortly.",
            code="upstream_unavailable",
            headers={"Retry-After": str(unavailable_s)},
        )
    if isinstance(exc, UpstreamTimeout):
        return ApiError(504, "The model provider timed out.", code="upstream_timeout")
    if exc is not None and exc.status in (400, 422):
        return ApiError(
            400,
            "The model provider rejected the request; check its parameters.",
            code="upstream_rejected",
        )
    if exc is not None and exc.status == 413:
        return ApiError(413, "The request is too large for this model.", code="body_too_large")
    return ApiError(502, "The model provider failed; try again later.", code="upstream_error")


def sane_usage(usage: Any) -> Usage | None:
    """`usage` if every count is a non-negative integer, else None (the caller estimates).
    Parts (cached, cache writes, reasoning) are clamped to the whole they belong to."""
    if not isinstance(usage, Usage):
        return None
    counts = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
    )
    if any(type(c) is not int or c < 0 for c in counts):
        return None
    if (
        usage.cached_tokens + usage.cache_write_tokens > usage.input_tokens
        or usage.reasoning_tokens > usage.output_tokens
    ):
        cached = min(usage.cached_tokens, usage.input_tokens)
        return Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_tokens=cached,
            cache_write_tokens=min(usage.cache_write_tokens, usage.input_tokens - cached),
            reasoning_tokens=min(usage.reasoning_tokens, usage.output_tokens),
        )
    return usage


def completion_chars(body: Any) -> int:
    """Characters of content and tool-call arguments in a chat completion's choices."""
    total = 0
    choices = body.get("choices") if isinstance(body, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            total += delta_chars({"choices": [{"delta": message}]})
    return total


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
    """Price the usage, count its tokens toward the key's tpm limit and hand the event to
    the publisher (which never blocks). Every request that took a hold ends here once."""
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
        state.metrics.finished(
            model.id, event.api, event.status, event.started_at, event.ttft_ms,
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


def _failed(
    state: RouterState, event: UsageEvent, model: Model, failed: RoutesFailed, budget: Budget
) -> ApiError:
    error = upstream_failure(failed.last, failed.unavailable_s)
    event.status, event.outcome = error.status, "upstream_error"
    event.attempts = budget.used
    if failed.entry is not None:
        event.route_index = failed.entry.index
    finish(state, event, model, failed.route)
    return error


class _NextModel(Exception):
    """Every route of this model failed retryably before any byte: its hold is given back
    and the client's next model is tried. Should no later model be held (402), the client
    gets this model's failure: `answer()` finishes its event (once) and gives its error."""

    def __init__(self, answer: Callable[[], ApiError]) -> None:
        super().__init__("next model")
        self.answer = answer


def _failed_after_give_back(
    state: RouterState, event: UsageEvent, model: Model, failed: RoutesFailed, routing: _Routing
) -> ApiError:
    # Its hold went back when the next model was tried: the event holds nothing, and has
    # no lease to return to (it would be returned twice).
    event.reserved_usd, event.lease, event.settle_early = ZERO, "", False
    return _failed(state, event, model, failed, routing.budget)


def _answered(event: UsageEvent, entry: RouteEntry, budget: Budget) -> None:
    event.route_index = entry.index
    event.attempts = budget.used


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
    pricier than what is left, or a sub-key's cap) is passed over for the next; the client
    gets a 402 only when no model could be held, else the last held model's failure."""
    ensure_metering(state)
    generation_id = renderer.generation_id = new_generation_id()
    if choice is None:
        return await _generate_one(
            state, key_hash, model, gen, renderer, started, generation_id, state.routes.budget()
        )
    budget = choice.budget(state.routes)
    bound, size = gen.input_bound, gen.input_bytes
    refused: Refused | None = None  # of the models not held, the one that needed least
    held_and_failed: _NextModel | None = None  # the last model held whose routes all failed
    for i, candidate in enumerate(choice.models):
        renderer.model = candidate.id
        if i:
            # Its own hold under its own id: the previous model's hold may not be gone yet
            # (its release failed: the TTL frees it). Nothing was rendered under the old id.
            generation_id = renderer.generation_id = new_generation_id()
        gen.input_bound, gen.input_bytes = bound, size
        more = i + 1 < len(choice.models)
        try:
            return await _generate_one(
                state, key_hash, candidate, gen, renderer, started, generation_id, budget,
                choice.strategy, more, limits=held_and_failed is None,
            )  # fmt: skip
        except _NextModel as next_model:
            held_and_failed = next_model
        except Refused as exc:
            if exc.status != 402:
                raise  # held up by requests in flight (429): the wait was the hold's
            if refused is None or (exc.needed_usd or ZERO) < (refused.needed_usd or ZERO):
                refused = exc
    if held_and_failed is not None:
        raise held_and_failed.answer()
    assert refused is not None  # the last model either answers, fails for good or is refused
    raise refused


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
    # Always bound the output upstream, so the hold covers the whole answer.
    ubody["max_completion_tokens" if "max_completion_tokens" in ubody else "max_tokens"] = (
        out_tokens
    )
    if gen.native is not None:
        gen.native["max_tokens"] = out_tokens
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
    routing = _Routing(budget, strategy, more)
    try:
        if gen.stream:
            return await _stream(
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
class _Routing:
    budget: Budget
    strategy: str | None  # the client's route.sort, as a strategy; None: the model's
    more: bool  # another of the client's models may follow this one

    def fail(
        self, state: RouterState, event: UsageEvent, model: Model, failed: RoutesFailed
    ) -> BaseException:
        if self.more and failed.retryable and not self.budget.spent(state.routes.clock()):
            return _NextModel(lambda: _failed_after_give_back(state, event, model, failed, self))
        return _failed(state, event, model, failed, self.budget)


async def _complete(
    state: RouterState,
    model: Model,
    ubody: dict[str, Any],
    event: UsageEvent,
    gen: Generation,
    renderer: Renderer,
    headers: dict[str, str],
    routing: _Routing,
) -> Reply:
    native = [False]

    async def call(provider: Provider, route: Route) -> Any:
        if _speaks(provider, gen):
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
        result, entry = await call_routes(state, model, traced, routing.budget, routing.strategy)
    except RoutesFailed as failed:
        raise routing.fail(state, event, model, failed) from None
    upstream_s = time.perf_counter() - called
    route = entry.route
    _answered(event, entry, routing.budget)
    relay: NativeRenderer | None = renderer if native[0] else None  # type: ignore[assignment]
    usage = sane_usage(result.usage)
    if usage is None:
        # Negative or non-integer counts are not believed: the documented estimate instead.
        max_output = ubody.get("max_completion_tokens") or ubody.get("max_tokens") or 1
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


def estimate_delivered(input_bytes: int, chars: int, pieces: int, max_output: int) -> Usage:
    """The documented estimate when a stream ends without upstream usage: input is the body
    size / 4, output the larger of the content pieces delivered and delivered chars / 4, but
    never more than the max_tokens sent upstream (the hold covers no more)."""
    output = min(max(pieces, math.ceil(chars / 4)), max_output)
    return Usage(input_tokens=math.ceil(input_bytes / 4), output_tokens=output)


def delta_chars(chunk: dict[str, Any]) -> int:
    """Characters of content and tool-call arguments in one chat-completions chunk."""
    total = 0
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        content = delta.get("content")
        if isinstance(content, str):
            total += len(content)
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                total += len(fn["arguments"])
    return total


async def _stream(
    state: RouterState,
    model: Model,
    ubody: dict[str, Any],
    event: UsageEvent,
    gen: Generation,
    renderer: Renderer,
    headers: dict[str, str],
    max_output: int,
    routing: _Routing,
) -> Reply:
    native = [False]

    async def open_stream(
        provider: Provider, route: Route
    ) -> tuple[AsyncIterator[StreamItem], StreamItem]:
        native[0] = _speaks(provider, gen)
        if native[0]:
            body = {**(gen.native or {}), "model": route.model, "stream": True}
            upstream = provider.stream_native(NativeRequest(gen.api, body, route.model, True))
        else:
            request = ChatRequest(
                body={**ubody, "model": route.model}, model=route.model, stream=True
            )
            upstream = provider.stream_chat(request)
        iterator = upstream.__aiter__()
        try:
            # Fallback is only possible before the first byte reaches the client.
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise UpstreamError(None, "empty stream") from None
        except BaseException:
            await close_quietly(iterator)
            raise
        return iterator, first

    traced = (
        open_stream if state.tracer is None else state.tracer.upstream(model.routes, open_stream)
    )
    try:
        (iterator, first), entry = await call_routes(
            state, model, traced, routing.budget, routing.strategy
        )
    except RoutesFailed as failed:
        raise routing.fail(state, event, model, failed) from None
    route = entry.route
    _answered(event, entry, routing.budget)
    book = state.routes
    first_byte = book.clock()

    reply = Reply({**STREAM_HEADERS, **headers})
    tally = [0, 0]  # content chars, content pieces
    upstream_usage: list[Usage] = []
    finished = [False]
    input_bytes = gen.input_bytes

    def delivered() -> tuple[Usage, bool]:
        """The usage so far: the upstream's if it reported one, else the estimate."""
        usage = sane_usage(upstream_usage[-1]) if upstream_usage else None
        if usage is not None:
            return usage, False
        return estimate_delivered(input_bytes, tally[0], tally[1], max_output), True

    def settle() -> None:
        if finished[0]:
            return
        finished[0] = True
        event.usage, event.usage_estimated = delivered()
        book.release(entry, event.usage.output_tokens, book.clock() - first_byte)
        finish(state, event, model, route)

    every = state.settings.stream_checkpoint_s
    checkpoints: list[float] = [0, time.monotonic() + every]  # published, next one due

    def checkpoint() -> None:
        # What the stream has delivered, through the event path: if this router dies, the
        # meter bills the latest checkpoint once the hold expires (docs/billing.md).
        checkpoints[0] += 1
        checkpoints[1] = time.monotonic() + every
        usage, estimated = delivered()
        copy = dataclasses.replace(
            event, usage=usage, usage_estimated=estimated, outcome="router_lost",
            checkpoint=int(checkpoints[0]),
            latency_ms=max(1, round((time.time() - event.started_at) * 1000)),
        )  # fmt: skip
        price(copy, model, route)
        state.publisher.submit(copy)

    async def body_iter() -> AsyncIterator[bytes]:
        # One generator for the whole relay: a nested one would cost a frame per chunk.
        # Chunks the upstream delivered together go out together: each piece yielded is
        # everything available before the next wait on the upstream.
        event.outcome = "client_disconnect"  # until the stream is seen to the end
        item: StreamItem = first
        render_chunk: Callable[[dict[str, Any]], bytes] = renderer.chunk
        chars_of: Callable[[dict[str, Any]], int] = delta_chars
        if native[0]:
            relay: NativeRenderer = renderer  # type: ignore[assignment]
            render_chunk, chars_of = relay.native_chunk, relay.native_chars
        burst: list[bytes] = []
        waiting: Waiting | None = None
        # Only protocols with a keep-alive wait in a task (the others await in place, the
        # cheaper way): a task can be waited on with a timeout, a ping sent, and waited on.
        keepalive = hasattr(renderer, "keepalive")
        ping_s = state.settings.stream_ping_s
        waiter: asyncio.Future[tuple[bool, Any]] | None = None
        try:
            try:
                while True:
                    if isinstance(item, Usage):
                        upstream_usage.append(item)
                    else:
                        if not event.ttft_ms:
                            event.ttft_ms = round((time.time() - event.started_at) * 1000)
                        chars = chars_of(item)
                        if chars:
                            tally[0] += chars
                            tally[1] += 1
                        piece = render_chunk(item)
                        if piece:
                            burst.append(piece)
                    try:
                        ready, step = next_step(iterator)
                        if not ready:
                            if every and time.monotonic() >= checkpoints[1]:
                                checkpoint()
                            if burst:
                                waiting = step
                                yield b"".join(burst)
                                burst = []
                            waiting = None
                            if keepalive and ping_s:
                                waiter = asyncio.ensure_future(_resolved(step))
                                while not (await asyncio.wait((waiter,), timeout=ping_s))[0]:
                                    ping = renderer.keepalive  # type: ignore[attr-defined]
                                    if ping:
                                        yield ping
                                more, step = waiter.result()
                                waiter = None
                                if not more:
                                    break
                            else:
                                step = await step
                    except StopAsyncIteration:
                        waiting = None
                        break
                    item = step
                event.outcome = "ok"
            except UpstreamError as exc:
                waiting = None
                book.broke(model.id, entry, exc)  # never retried: the client has data
                event.outcome = "upstream_error"
                event.status = 504 if isinstance(exc, UpstreamTimeout) else 502
                burst.append(renderer.stream_error(event.status))
            settle()
            burst.append(renderer.stream_end(event.usage, event.cost_usd))
            reply.finished = True
            yield b"".join(burst)
        finally:
            # Runs on a client disconnect too: bill what was delivered, close the upstream.
            settle()
            if waiting is not None:
                waiting.abandon()
            if waiter is not None:  # the client left during a silence: stop the wait first
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
            await close_quietly(iterator, shield=True)

    reply.stream = body_iter()
    return reply


# --- embeddings ----------------------------------------------------------------------------


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
        raise _failed(state, event, model, failed, budget) from None
    except BaseException:  # cancelled, or a provider's bug: the hold goes back now
        await give_back(state, generation_id, event.lease, event.reserved_usd)
        raise
    state.routes.release(entry)
    route = entry.route
    _answered(event, entry, budget)
    usage = sane_usage(result.usage)
    if usage is None:
        usage = Usage(input_tokens=input_bound)  # the hold's own bound
        event.usage_estimated = True
    result.usage = event.usage = usage
    event.ttft_ms = round((time.time() - started) * 1000)
    finish(state, event, model, route)
    receipt = state.receipts.sign(event_receipt(event)) if state.receipts is not None else ""
    return result, event.cost_usd, receipt
