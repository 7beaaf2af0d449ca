"""POST /v1/messages: Anthropic's Messages API, an adapter over the request core. Any route
serves it: the request is read into the chat-completions body the providers speak
(router/anthropic_request.py), and the answer written back in Anthropic's shape
(router/anthropic_answer.py). Errors too are in Anthropic's shape:
{"type": "error", "error": {"type", "message"}}."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.errors import ApiError
from apifast.request_body import parse_json_object, read_body
from apifast.router.anthropic_answer import MessagesRenderer
from apifast.router.anthropic_request import chat_body, native_body, translate
from apifast.router.core import authenticate, generate
from apifast.router.core_types import Generation, Reply
from apifast.router.framework_reply import framework_response
from apifast.router.route_prefs import (
    OPENAPI_MODEL_REQUIRED,
    OPENAPI_PROPERTIES,
    resolve_request,
)
from apifast.router.state import RouterState
from apifast.router.token_count import ensure_key_usable, input_token_count

api = APIRouter(tags=["messages"])

_MESSAGES_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["max_tokens", "messages"],
                    "anyOf": OPENAPI_MODEL_REQUIRED,
                    "properties": {
                        "model": {"type": "string"},
                        "max_tokens": {"type": "integer", "minimum": 1},
                        "messages": {"type": "array", "minItems": 1, "items": {"type": "object"}},
                        "system": {},
                        "stream": {"type": "boolean"},
                        **OPENAPI_PROPERTIES,
                    },
                }
            }
        },
    }
}


def authorization(request: Request) -> str:
    """`x-api-key: af-...` (what the anthropic SDK sends) or `Authorization: Bearer af-...`."""
    return authorization_from(
        request.headers.get("x-api-key"), request.headers.get("authorization")
    )


def authorization_from(x_api_key: str | None, authorization: str | None) -> str:
    if x_api_key is not None:
        return f"Bearer {x_api_key.strip()}"
    if authorization is None:
        # Name the header an Anthropic client sends, not only the OpenAI one.
        raise ApiError(401, "Missing API key: send 'x-api-key: af-...' (or 'Authorization: "
                       "Bearer af-...').", code="missing_api_key")  # fmt: skip
    return authorization


@api.post("/v1/messages", openapi_extra=_MESSAGES_SCHEMA)
async def create_message(request: Request) -> Response:
    # The server normally answers this path in router/fast_path.py, without the framework;
    # this route serves the OpenAPI schema and any request the fast path passes on.
    state: RouterState = request.app.state.apifast
    started = time.time()
    settings = state.settings
    try:
        key_hash = authenticate(state, authorization(request))
        raw = await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
        reply = await handle_message(state, key_hash, raw, started)
    except ApiError as exc:
        return exc.response(anthropic=True)
    return framework_response(reply)


async def handle_message(state: RouterState, key_hash: bytes, raw: bytes, started: float) -> Reply:
    """Parse, translate and hand over to the core; raises ApiError on refusal.
    anthropic-version and anthropic-beta are accepted and ignored."""
    body = parse_json_object(raw)
    model, choice = resolve_request(state, body, "chat")
    chat, _, native_only = translate(body)
    gen = Generation.translated(
        chat, "messages", len(raw), native_body(body), native_only=native_only
    )
    renderer = MessagesRenderer(model.id)
    return await generate(state, key_hash, model, gen, renderer, started, choice)


@api.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    """{"input_tokens": N}: the first route's upstream count where its provider has one,
    else ApiFast's estimate (router/token_count.py). Free: no hold, no usage event."""
    state: RouterState = request.app.state.apifast
    settings = state.settings
    try:
        key_hash = authenticate(state, authorization(request))
        raw = await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
        body = parse_json_object(raw)
        # `models` / `route` as the request takes them: what it refuses, the count refuses;
        # the count is for the first model the request would try.
        model, _ = resolve_request(state, body, "chat")
        body.setdefault("max_tokens", 1)  # not part of a count request
        chat, _ = chat_body({**body, "stream": False})
        # The key's refusals where the request's hold would give them: after the body's.
        await ensure_key_usable(state, key_hash, model.id)
        native = ("messages", native_body(body))
        count = await input_token_count(state, model, chat, len(raw), native)
    except ApiError as exc:
        return exc.response(anthropic=True)
    return Response(orjson.dumps({"input_tokens": count}), media_type="application/json")
