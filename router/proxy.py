"""Shared steps of a proxied request: body limits, catalog lookup, holds and route fallback."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from apifast.providers import Provider, UpstreamError, UpstreamTimeout
from router.catalog import Model, Route
from router.errors import ApiError
from router.reservations import Hold, release, reserve
from router.state import RouterState

log = logging.getLogger("apifast.router")
T = TypeVar("T")


def new_generation_id() -> str:
    return "gen-" + os.urandom(12).hex()


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_asgi_body(content_length: str | None, receive: Receive, limit: int) -> bytes:
    """`read_body` for a raw ASGI request; raises ClientDisconnect if the client goes away."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the usual case: the whole body in one message
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


def find_model(state: RouterState, model_id: str, kind: str) -> Model:
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


async def hold_funds(
    state: RouterState,
    key_hash: bytes,
    generation_id: str,
    min_usd: Decimal,
    max_usd: Decimal,
) -> Hold:
    if state.reserver is not None:
        hold = await state.reserver.reserve(key_hash, generation_id, min_usd, max_usd)
    else:
        ttl_s = state.settings.reservation_ttl_s
        hold = await reserve(state.pool, key_hash, generation_id, min_usd, max_usd, ttl_s)
    settings = state.settings
    wait = state.key_limits.check_request(
        hold.key_id, hold.rpm_limit or settings.default_rpm_limit
    ) or state.key_limits.check_tokens(hold.key_id, hold.tpm_limit or settings.default_tpm_limit)
    if wait:
        await release(state.pool, generation_id)
        retry_after = str(max(1, round(wait + 0.5)))
        raise ApiError(
            429,
            "Rate limit reached for this key. Retry after the number of seconds in Retry-After.",
            code="rate_limit_exceeded",
            headers={"Retry-After": retry_after},
        )
    return hold


def upstream_failure(exc: UpstreamError | None) -> ApiError:
    """What the client learns of an upstream failure: a status, never the upstream's text."""
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


async def try_routes(
    state: RouterState,
    model: Model,
    call: Callable[[Provider, Route], Awaitable[T]],
) -> tuple[T, Route]:
    """Call each route in order until one answers; fall back only on retryable errors."""
    last: UpstreamError | None = None
    for route in model.routes:
        provider = state.providers.get(route.provider)
        if provider is None:
            continue
        try:
            return await call(provider, route), route
        except UpstreamError as exc:
            last = exc
            # Status only: upstream error bodies may echo the prompt.
            log.warning(
                "model %s route %s failed: status=%s %s",
                model.id, route.provider, exc.status, type(exc).__name__,
            )  # fmt: skip
            if not exc.retryable:
                break
    raise _RoutesFailed(last, model.routes[-1] if model.routes else None)


class _RoutesFailed(Exception):
    def __init__(self, last: UpstreamError | None, route: Route | None) -> None:
        super().__init__("all routes failed")
        self.last = last
        self.route = route


RoutesFailed = _RoutesFailed
