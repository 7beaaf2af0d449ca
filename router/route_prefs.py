"""The client's routing preferences, the same in all three protocols' bodies:

    "models": ["a", "b", ...]        public models to fall back across, each at its own price
    "route": {"sort": "price" | "latency" | "throughput",
              "max_price": {"prompt": "1.00", "completion": "2.00",    USD per million tokens
                            "request": "0.01"},                        USD per request
              "allow_fallbacks": true}

Nothing here names, or can name, an upstream: `sort` orders a model's routes without showing
them, and `max_price` is compared with the public price the client pays. Both fields are
read here and never sent upstream. A request that no model can serve within `max_price`
gets a 400 (an unknown model a 404) before any upstream call.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from apifast.catalog.toml import Model
from apifast.errors import ApiError, bad
from apifast.money import USD_PLACES, MoneyError, parse_usd
from apifast.router.core import resolve
from apifast.router.route_book import Budget, RouteBook
from apifast.router.route_choice import SORTS
from apifast.router.validation import model_name

if TYPE_CHECKING:
    from apifast.router.state import RouterState

MAX_MODELS = 8
_ROUTE_KEYS = frozenset({"sort", "max_price", "allow_fallbacks"})
_PRICE_KEYS = frozenset({"prompt", "completion", "request"})

# As parse_usd reads a cap: up to USD_PLACES decimal places, compared exactly (a catalog
# price has at most 6, so a finer cap still tells "within" from "above" exactly).
_USD_PER_MTOK = {
    "type": "string",
    "pattern": rf"^\d+(\.\d{{1,{USD_PLACES}}})?$",
    "description": f"USD per million tokens, as a decimal string (at most {USD_PLACES} "
    "places, compared exactly); a JSON integer is taken too, a number with a fraction is "
    "refused (it would pass through a float)",
}
# `model`, or `models`, or both: what the request schemas require instead of `model` alone.
OPENAPI_MODEL_REQUIRED: list[dict[str, Any]] = [{"required": ["model"]}, {"required": ["models"]}]
# The two fields in the request schema of each protocol's endpoint, one definition for all
# three (router/chat.py, messages.py, responses.py add it to their own body schema).
OPENAPI_PROPERTIES: dict[str, Any] = {
    "models": {
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_MODELS,
        "items": {"type": "string", "minLength": 1},
        "description": "Public models (GET /v1/models) to fall back across, tried after "
        "`model` (which may then be left out); each is billed at its own price, and the "
        "answer's `model` says which one answered.",
    },
    "route": {
        "type": "object",
        "additionalProperties": False,
        "description": "Routing preferences; they never name or show an upstream.",
        "properties": {
            "sort": {
                "type": "string",
                "enum": sorted(SORTS),
                "description": "Order each model's routes by price, latency (time to first "
                "byte) or throughput; `price` also orders the models by their public price.",
            },
            "max_price": {
                "type": "object",
                "additionalProperties": False,
                "description": "Leave out the models whose public price is above this: 400 "
                "no_model_within_max_price when none is left.",
                "properties": {
                    "prompt": _USD_PER_MTOK,
                    "completion": _USD_PER_MTOK,
                    "request": {
                        **_USD_PER_MTOK,
                        "description": "USD per request (a model's `pricing.request_usd`), "
                        "as a decimal string; a model with no per-request price passes any cap",
                    },
                },
            },
            "allow_fallbacks": {
                "type": "boolean",
                "description": "false: one attempt, on the first choice only (default true).",
            },
        },
    },
}


@dataclass(frozen=True, slots=True)
class Choice:
    """The models one request may be served by, in the order they are tried."""

    models: tuple[Model, ...]
    strategy: str | None  # route.sort as a strategy; None: each model's own
    single: bool  # allow_fallbacks false: one attempt, on the first choice

    def budget(self, book: RouteBook) -> Budget:
        budget = book.budget()
        if self.single:
            budget.attempts = 1
        return budget


def _price_cap(raw: Any, name: str) -> Decimal | None:
    if raw is None:
        return None
    try:
        return parse_usd(raw, field=f"route.max_price.{name}")
    except MoneyError as exc:
        field = f"route.max_price.{name}"
        raise bad(field, str(exc).removeprefix(f"{field} ")) from None


def _public_price(model: Model) -> tuple[Decimal, Decimal]:
    return model.price.input_usd_per_mtok, model.price.output_usd_per_mtok


def resolve_request(
    state: RouterState, body: dict[str, Any], kind: str
) -> tuple[Model, Choice | None]:
    """The model to serve `body` (and, when the client set `models` or `route`, the models it
    may fall back to); ApiError 400/404 in the protocol's shape otherwise. Removes both
    fields from `body`, so nothing of them goes upstream."""
    models_raw = body.pop("models", None)
    route = body.pop("route", None)
    if models_raw is None and route is None:
        return resolve(state, model_name(body), kind), None
    # (model id, the field that names it), in the order they are tried.
    ids: list[tuple[str, str]] = []
    if body.get("model") is not None or models_raw is None:
        ids.append((model_name(body), "model"))
    if models_raw is not None:
        if not isinstance(models_raw, list) or not models_raw:
            raise bad("models", "must be a non-empty array of model ids")
        if len(models_raw) > MAX_MODELS:
            raise bad("models", f"at most {MAX_MODELS} models")
        for i, value in enumerate(models_raw):
            if not isinstance(value, str) or not value:
                raise bad(f"models[{i}]", "must be a model id from GET /v1/models")
            if value in models_raw[:i]:
                # Most likely a mistake for another model; a model is tried once either way.
                raise bad(f"models[{i}]", f"repeats models[{models_raw.index(value)}]")
            # `model` listed again in `models` (as OpenRouter's examples do) is tried once.
            if not ids or value != ids[0][0]:
                ids.append((value, f"models[{i}]"))
    strategy, single = None, False
    prompt_cap: Decimal | None = None
    completion_cap: Decimal | None = None
    request_cap: Decimal | None = None  # a per-request fee would escape the token caps
    if route is not None:
        if not isinstance(route, dict):
            raise bad("route", "must be an object: {sort, max_price, allow_fallbacks}")
        unknown = set(route) - _ROUTE_KEYS
        if unknown:
            raise bad(f"route.{sorted(unknown)[0]}", "unknown field; route takes sort, "
                      "max_price and allow_fallbacks")  # fmt: skip
        sort = route.get("sort")
        if sort is not None:
            if sort not in SORTS:
                raise bad("route.sort", "must be price, latency or throughput")
            strategy = SORTS[sort]
        caps = route.get("max_price")
        if caps is not None:
            if not isinstance(caps, dict) or set(caps) - _PRICE_KEYS:
                raise bad("route.max_price", "must be an object {prompt, completion} of USD "
                          "per million tokens (and request, USD per request), as decimal "
                          "strings")  # fmt: skip
            prompt_cap = _price_cap(caps.get("prompt"), "prompt")
            completion_cap = _price_cap(caps.get("completion"), "completion")
            request_cap = _price_cap(caps.get("request"), "request")
        fallbacks = route.get("allow_fallbacks", True)
        if not isinstance(fallbacks, bool):
            raise bad("route.allow_fallbacks", "must be a boolean")
        single = not fallbacks
    # Every named model must exist and fit the endpoint, before anything is held or called.
    candidates = [resolve(state, model_id, kind, param) for model_id, param in ids]
    within = [
        m
        for m in candidates
        if (prompt_cap is None or m.price.input_usd_per_mtok <= prompt_cap)
        and (completion_cap is None or m.price.output_usd_per_mtok <= completion_cap)
        and (request_cap is None or m.price.request_usd <= request_cap)
    ]
    if not within:
        raise ApiError(
            400,
            "route.max_price: no requested model is offered within this price; "
            "GET /v1/models lists the prices.",
            param="route.max_price",
            code="no_model_within_max_price",
        )
    if strategy == "lowest_cost":
        within.sort(key=_public_price)
    if single:
        within = within[:1]
    return within[0], Choice(tuple(within), strategy, single)
