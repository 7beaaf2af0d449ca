"""GET /v1/models and GET /v1/models/{id}, with pricing. Upstream names are never shown."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.catalog.toml import Model
from apifast.errors import ApiError
from apifast.money import format_usd
from apifast.router.state import RouterState

api = APIRouter(tags=["models"])

_CREATED = 1_735_689_600  # a fixed epoch: the catalog has no creation times
_CREATED_AT = "2025-01-01T00:00:00Z"  # the same instant, as Anthropic's RFC 3339


def wants_anthropic(request: Request) -> bool:
    """The anthropic SDKs send `anthropic-version` on every request; OpenAI's never do."""
    return "anthropic-version" in request.headers


def anthropic_model_json(model: Model) -> dict[str, Any]:
    return {"type": "model", "id": model.id, "display_name": model.id, "created_at": _CREATED_AT}


def model_json(model: Model) -> dict[str, Any]:
    p = model.price
    pricing: dict[str, Any] = {
        "currency": "USD",
        "input_usd_per_mtok": format_usd(p.input_usd_per_mtok),
        "output_usd_per_mtok": format_usd(p.output_usd_per_mtok),
        "cached_input_usd_per_mtok": format_usd(
            p.input_usd_per_mtok
            if p.cached_input_usd_per_mtok is None
            else p.cached_input_usd_per_mtok
        ),
        "cache_write_usd_per_mtok": format_usd(
            p.input_usd_per_mtok
            if p.cache_write_usd_per_mtok is None
            else p.cache_write_usd_per_mtok
        ),
        "request_usd": format_usd(p.request_usd),
    }
    out: dict[str, Any] = {
        "id": model.id,
        "object": "model",
        "created": _CREATED,
        "owned_by": model.owned_by,
        "type": model.kind,
        "pricing": pricing,
    }
    if model.description:
        out["description"] = model.description
    if model.max_output_tokens:
        out["max_output_tokens"] = model.max_output_tokens
    if model.context_window:
        out["context_window"] = model.context_window
    if model.demo:
        out["demo"] = True
    return out


@api.get("/v1/models")
async def list_models(request: Request) -> Response:
    state: RouterState = request.app.state.apifast
    models = sorted(state.catalog.models.values(), key=lambda m: m.id)
    if wants_anthropic(request):
        return _json(anthropic_page(models, request))
    return _json({"object": "list", "data": [model_json(m) for m in models]})


def anthropic_page(models: list[Model], request: Request) -> dict[str, Any]:
    """Anthropic's list page: `limit` (1-1000, default 20), `after_id` / `before_id` cursors."""
    params = request.query_params
    raw_limit = params.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
        raise ApiError(400, "limit: must be an integer from 1 to 1000", param="limit")
    limit = int(raw_limit)
    ids = [m.id for m in models]
    start, end = 0, len(models)
    for name in ("after_id", "before_id"):
        cursor = params.get(name)
        if cursor is not None and cursor not in ids:
            raise ApiError(400, f"{name}: no model '{cursor}' in the list", param=name)
    if "after_id" in params:
        start = ids.index(params["after_id"]) + 1
    if "before_id" in params:
        end = ids.index(params["before_id"])
        start = max(start, end - limit)
    page = models[start:end][:limit]
    return {
        "data": [anthropic_model_json(m) for m in page],
        "has_more": start + len(page) < end,
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
    }


def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@api.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Response:
    state: RouterState = request.app.state.apifast
    model = state.catalog.get(model_id)
    if model is None:
        raise ApiError(404, f"The model '{model_id}' does not exist.", param="model",
                       code="model_not_found")  # fmt: skip
    if wants_anthropic(request):
        return _json(anthropic_model_json(model))
    return _json(model_json(model))
