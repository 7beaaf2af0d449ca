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
    data = [model_json(m) for m in sorted(state.catalog.models.values(), key=lambda m: m.id)]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@api.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Response:
    state: RouterState = request.app.state.apifast
    model = state.catalog.get(model_id)
    if model is None:
        raise ApiError(404, f"The model '{model_id}' does not exist.", param="model",
                       code="model_not_found")  # fmt: skip
    return Response(orjson.dumps(model_json(model)), media_type="application/json")
