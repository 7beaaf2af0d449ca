"""A request's input tokens, counted free of charge for the counting endpoints
(`POST /v1/messages/count_tokens`, `POST /v1/responses/input_tokens`): the first route's
upstream count where its provider has one (Anthropic), else ApiFast's estimate. No hold, no
usage event."""

from __future__ import annotations

import logging
import math
from typing import Any

from apifast.catalog.toml import Model, Route
from apifast.db import Queries
from apifast.providers import ChatRequest, NativeRequest, UpstreamError
from apifast.router.media import media_token_bound
from apifast.router.reservations import DATABASE_DOWN, database_unavailable, key_refusal
from apifast.router.state import RouterState

log = logging.getLogger("apifast.router")
Q = Queries("apifast.router")


async def ensure_key_usable(state: RouterState, key_hash: bytes, model: str) -> None:
    """A count is free, but only for a key that could make the request on `model` (the
    public id): the refusals its hold would give, with nothing held. 401 for an unknown, a
    disabled (or rotated-away) or an expired key, 403 for a model a sub-key may not use."""
    try:
        status = await state.pool.fetchval(Q.key_request_status, key_hash, model)
    except DATABASE_DOWN:
        raise database_unavailable() from None
    refusal = key_refusal(status or "unknown")
    if refusal is not None:
        raise refusal


async def input_token_count(
    state: RouterState,
    model: Model,
    chat: dict[str, Any],
    body_bytes: int,
    native: tuple[str, dict[str, Any]] | None = None,
) -> int:
    """The upstream's count, else the estimate: the body's bytes / 4, plus the model's
    per-part bound for each image, audio or file part. `native` (protocol, the client's body
    as a native route gets it): a route speaking that protocol counts the body as sent."""
    count = await _upstream_count(state, model.routes, chat, native)
    if count is None:
        count = math.ceil(body_bytes / 4) + media_token_bound(model, chat["messages"])
    return count


async def _upstream_count(
    state: RouterState,
    routes: tuple[Route, ...],
    chat: dict[str, Any],
    native: tuple[str, dict[str, Any]] | None,
) -> int | None:
    for route in routes:
        provider = state.providers.get(route.provider)
        if provider is None:
            continue
        try:
            if native is not None and native[0] in provider.native_protocols:
                request = NativeRequest(native[0], {**native[1], "model": route.model}, route.model)
                count = await provider.count_tokens_native(request)
                if count is not None:
                    return count
            return await provider.count_tokens(
                ChatRequest(body={**chat, "model": route.model}, model=route.model)
            )
        except UpstreamError as exc:  # the estimate instead; status only, as for chat
            log.warning("count_tokens on %s failed: status=%s", route.provider, exc.status)
            return None
    return None
