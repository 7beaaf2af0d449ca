"""Calling one model's routes in this request's order (router/route_book.py) until one
answers, falling back only on retryable errors within the request's attempt budget; and what
a request learns of how that went: the route that answered, or the client's error for an
upstream failure (a status, never the upstream's text) with the failed request finished."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

from apifast.catalog.toml import Model, Route
from apifast.errors import ApiError
from apifast.metering.event import UsageEvent
from apifast.providers import Provider, UnsupportedParameter, UpstreamError, UpstreamTimeout
from apifast.router.finishing import finish
from apifast.router.route_book import Budget
from apifast.router.route_choice import RouteEntry
from apifast.router.route_fit import NO_SKIP, unsupported_error
from apifast.router.state import RouterState

log = logging.getLogger("apifast.router")
T = TypeVar("T")


# Upstream statuses that mean "busy, retry later": Anthropic's 529 and the usual 503.
OVERLOADED = frozenset({503, 529})


class RoutesFailed(Exception):
    def __init__(
        self,
        last: UpstreamError | None,
        entry: RouteEntry | None,
        unavailable_s: int = 0,
        statuses: frozenset[int | None] = frozenset(),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__("all routes failed")
        self.last = last
        self.entry = entry  # the last route attempted
        self.unavailable_s = unavailable_s  # >0: no route was admitted; retry after this
        self.statuses = statuses  # of every attempt (None: no response)
        self.retry_after_s = retry_after_s  # the soonest an attempt's upstream named

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
    skip: frozenset[str] = NO_SKIP,
) -> tuple[T, RouteEntry]:
    """Call the routes in this request's order until one answers; fall back only on
    retryable errors, within `budget`. Routes of the providers in `skip` (which cannot
    express the request, router/route_fit.py) are passed over. The answering route stays
    counted as in flight until `state.routes.release` (the caller's, once the answer is
    relayed)."""
    book = state.routes
    if budget is None:
        budget = book.budget()
    last: UpstreamError | None = None
    tried: RouteEntry | None = None
    skipped: list[RouteEntry] = []
    statuses: set[int | None] = set()
    retry_after: float | None = None
    providers = state.providers
    for entry in book.order(model, strategy):
        route = entry.route
        provider = providers.get(route.provider)
        if provider is None or route.provider in skip:
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
            statuses.add(exc.status)
            if exc.retry_after_s is not None:
                seconds = exc.retry_after_s
                retry_after = seconds if retry_after is None else min(seconds, retry_after)
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
    raise RoutesFailed(last, tried, wait, frozenset(statuses), retry_after)


def _retry_after(seconds: float | None) -> dict[str, str]:
    # ApiFast's own header from the upstream's number; no upstream header is passed on.
    return {} if seconds is None else {"Retry-After": str(max(1, math.ceil(seconds)))}


def upstream_failure(
    exc: UpstreamError | None,
    unavailable_s: int = 0,
    statuses: frozenset[int | None] = frozenset(),
    retry_after_s: float | None = None,
) -> ApiError:
    """What the client learns of an upstream failure: a status, never the upstream's text.
    The upstreams failed after every route was tried: 502 (504 for a timeout), as the
    gateway has always answered. In Anthropic's shape, every route rate-limited is 429
    rate_limit_error and every route overloaded 529 overloaded_error, which its SDK retries;
    the code says which in both shapes."""
    if exc is None and unavailable_s:
        return ApiError(
            503,
            "The model is temporarily unavailable; retry shortly.",
            code="upstream_unavailable",
            headers={"Retry-After": str(unavailable_s)},
        )
    if isinstance(exc, UnsupportedParameter):
        return unsupported_error(exc)
    if statuses == {429}:
        return ApiError(
            502,
            "The model provider is rate limiting requests; retry shortly.",
            code="upstream_rate_limited",
            headers=_retry_after(retry_after_s),
            anthropic_status=429,
        )
    if statuses and statuses <= OVERLOADED:
        return ApiError(
            502,
            "The model provider is overloaded; retry shortly.",
            code="upstream_overloaded",
            headers=_retry_after(retry_after_s),
            anthropic_status=529,
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


def finish_failed(
    state: RouterState, event: UsageEvent, model: Model, failed: RoutesFailed, budget: Budget
) -> ApiError:
    error = upstream_failure(
        failed.last, failed.unavailable_s, failed.statuses, failed.retry_after_s
    )
    # The status the client saw: a /v1/messages client gets Anthropic's (429, 529).
    event.status = error.client_status(event.api == "messages")
    event.outcome = "upstream_error"
    event.attempts = budget.used
    if failed.entry is not None:
        event.route_index = failed.entry.index
    finish(state, event, model, failed.route)
    error.counted = True  # finish counted it
    return error


def record_route(event: UsageEvent, entry: RouteEntry, budget: Budget) -> None:
    event.route_index = entry.index
    event.attempts = budget.used
