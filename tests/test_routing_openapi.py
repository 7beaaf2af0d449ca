"""/openapi.json documents the client's routing preferences, `models` and `route`, in the
request schema of all three protocols' endpoints and of /v1/embeddings, as
router/route_prefs.py reads them; and a body the schema allows (`models` instead of `model`)
is served."""

from __future__ import annotations

import re
from typing import Any

from apifast.router.route_choice import SORTS
from apifast.router.route_prefs import MAX_MODELS
from tests.harness import Stack

PATHS = ("/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/embeddings")


def _body_schema(openapi: dict[str, Any], path: str) -> dict[str, Any]:
    body = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    schema: dict[str, Any] = body["schema"]
    return schema


async def test_openapi_lists_models_and_route_on_every_protocol(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.get("/openapi.json")
    assert r.status_code == 200
    openapi = r.json()
    for path in PATHS:
        schema = _body_schema(openapi, path)
        props = schema["properties"]
        models = props["models"]
        assert models["type"] == "array" and models["items"]["type"] == "string", path
        assert models["maxItems"] == MAX_MODELS
        route = props["route"]
        assert route["type"] == "object" and route["additionalProperties"] is False
        assert set(route["properties"]) == {"sort", "max_price", "allow_fallbacks"}
        assert route["properties"]["sort"]["enum"] == sorted(SORTS)
        assert route["properties"]["allow_fallbacks"]["type"] == "boolean"
        prices = route["properties"]["max_price"]["properties"]
        assert set(prices) == {"prompt", "completion", "request"}
        assert all(p["type"] == "string" for p in prices.values())
        # The pattern takes what the router takes: up to 12 places, never 13.
        assert all(re.fullmatch(p["pattern"], "0.399999999999") for p in prices.values())
        assert not any(re.fullmatch(p["pattern"], "0.3999999999999") for p in prices.values())
        # `model` or `models`: either one names what may serve the request.
        assert "model" not in schema["required"]
        assert schema["anyOf"] == [{"required": ["model"]}, {"required": ["models"]}]


async def test_a_body_with_models_and_no_model_is_served(stack: Stack) -> None:
    key = await stack.create_key("5.00")
    body = {
        "models": ["fast-chat"],
        "route": {"sort": "price", "max_price": {"prompt": "100", "completion": "100"}},
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with stack.client(key) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "fast-chat"


async def test_max_price_takes_json_integers_and_refuses_fractions(stack: Stack) -> None:
    key = await stack.create_key("5.00")
    messages = [{"role": "user", "content": "hi"}]
    async with stack.client(key) as c:
        whole = {"max_price": {"prompt": 100, "completion": 100}}
        r = await c.post("/v1/chat/completions",
                         json={"model": "fast-chat", "route": whole, "messages": messages})  # fmt: skip
        assert r.status_code == 200, r.text
        # An integer is exact: 0 is below fast-chat's price, so nothing is left to serve.
        none = {"max_price": {"prompt": 0}}
        r = await c.post("/v1/chat/completions",
                         json={"model": "fast-chat", "route": none, "messages": messages})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_model_within_max_price"
        for name, value in (("prompt", 100.0), ("completion", 0.5)):
            route = {"max_price": {name: value}}
            r = await c.post("/v1/chat/completions",
                             json={"model": "fast-chat", "route": route, "messages": messages})  # fmt: skip
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == f"route.max_price.{name}"
            assert error["message"] == (
                f"route.max_price.{name}: must not be a number with a fraction (it would pass "
                'through a float): send a decimal string like "5.00"'
            )
