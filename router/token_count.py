"""A request's input tokens, counted free of charge for the counting endpoints
(`POST /v1/messages/count_tokens`, `POST /v1/responses/input_tokens`): the first route's
upstream count where its provider has one (Anthropic), else ApiFast's estimate. No hold, no
usage event."""

from __future__ import annotations

import logging
import math
from typing import Any

from apifast.auth import key_row
from apifast.catalog.toml import Model, Route
from apifast.errors import ApiError
from apifast.providers import ChatRequest, UpstreamError
from apifast.router.media import media_token_bound
from apifast.router.state import RouterState

log = logging.getLogger("apifast.router")


async def ensure_key_usable(state: RouterState, key_hash: bytes) -> None:
    """A count is free, but only for a key that could make the request: 401 for a disabled
    (or rotated-away) key, as the request itself answers it."""
    row = await key_row(state.pool, key_hash)
    if row["disabled"]:
        raise ApiError(401, "This API key has been disabled.", code="key_disabled")


async def input_token_count(
    state: RouterState, model: Model, chat: dict[str, Any], body_bytes: int
) -> int:
    """The upstream's count, else the estimate: the body's bytes / 4, plus the model's
    per-part bound for each image, audio or file part."""
    count = await _upstream_count(state, model.routes, chat)
    if count is None:
        count = math.ceil(body_bytes / 4) + media_token_bound(model, chat["messages"])
    return count


async def _upstream_count(
    state: RouterState, routes: tuple[Route, ...], chat: dict[str, Any]
) -> int | None:
    for route in routes:
        provider = state.providers.get(route.provider)
        if provider is None:
            continue
        try:
            return await provider.count_tokens(
                ChatRequest(body={**chat, "model": route.model}, model=route.model)
            )
        except UpstreamError as exc:  # the estimate instead; status only, as for chat
            log.warning("count_tokens on %s failed: status=%s", route.provider, exc.status)
            return None
    return None
