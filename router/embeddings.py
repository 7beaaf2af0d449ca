"""POST /v1/embeddings."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.money import quantize_up
from apifast.providers import EmbeddingsRequest, EmbeddingsResponse, Provider
from router.auth import key_hash_from_request
from router.catalog import Route
from router.openai_shape import embeddings_body
from router.proxy import (
    RoutesFailed,
    ensure_metering,
    find_model,
    hold_funds,
    new_generation_id,
    read_body,
    try_routes,
    upstream_failure,
)
from router.state import RouterState
from router.usage_event import UsageEvent
from router.validation import model_name, parse_json_object, upstream_body, validate_embeddings

api = APIRouter(tags=["embeddings"])

_EMBEDDINGS_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model", "input"],
                    "properties": {"model": {"type": "string"}, "input": {}},
                }
            }
        },
    }
}


@api.post("/v1/embeddings", openapi_extra=_EMBEDDINGS_SCHEMA)
async def embeddings(request: Request) -> Response:
    state: RouterState = request.app.state.apifast
    started = time.time()
    key_hash = key_hash_from_request(request, state.secret)
    raw = await read_body(request, state.settings.max_body_bytes)
    body = parse_json_object(raw)
    model = find_model(state, model_name(body), "embeddings")
    validate_embeddings(body)
    ensure_metering(state)
    generation_id = new_generation_id()
    bound = quantize_up(model.price.bound(len(raw), 0))
    hold = await hold_funds(state, key_hash, generation_id, bound, bound)
    event = UsageEvent(
        generation_id=generation_id,
        key_hash=key_hash,
        key_id=hold.key_id,
        model=model.id,
        endpoint="embeddings",
        stream=False,
        reserved_usd=hold.reserved,
        started_at=started,
    )
    ubody = upstream_body(body, "")

    async def call(provider: Provider, route: Route) -> Any:
        request_ = EmbeddingsRequest(body={**ubody, "model": route.model}, model=route.model)
        return await provider.embeddings(request_)

    route: Route | None
    try:
        result, route = await try_routes(state, model, call)
    except RoutesFailed as failed:
        error = upstream_failure(failed.last)
        event.status, event.outcome, route = error.status, "upstream_error", failed.route
        result = None
    if route is not None:
        event.provider, event.upstream_model = route.provider, route.model
    if isinstance(result, EmbeddingsResponse):
        event.usage = result.usage
        event.cost_usd = model.price.cost(result.usage)
        if route is not None:
            event.upstream_cost_usd = route.cost.cost(result.usage)
    event.latency_ms = event.ttft_ms = round((time.time() - started) * 1000)
    state.publisher.submit(event)
    if result is None:
        raise error
    content = embeddings_body(result.body, model.id, result.usage, event.cost_usd)
    return Response(content, media_type="application/json")
