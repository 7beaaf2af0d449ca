"""POST /v1/responses: OpenAI's Responses API, stateless, an adapter over the request core.
Any route serves it: the request is read into the chat-completions body the providers speak
(router/responses_input.py) and the answer written back as a Response
(router/responses_shape.py). On a route whose provider speaks the Responses API natively
(the `openai` type with `native_responses = true`) the client's body passes through instead
(router/responses_native.py). Errors are in OpenAI's shape, as for chat."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.errors import ApiError
from apifast.request_body import parse_json_object, read_body
from apifast.router.core import authenticate, generate
from apifast.router.core_types import Generation, Reply
from apifast.router.framework_reply import framework_response
from apifast.router.responses_input import chat_body, native_only_fields
from apifast.router.responses_native import RESPONSES_MIN_OUTPUT, native_body
from apifast.router.responses_shape import ResponsesRenderer, request_echo
from apifast.router.route_prefs import (
    OPENAPI_MODEL_REQUIRED,
    OPENAPI_PROPERTIES,
    resolve_request,
)
from apifast.router.state import RouterState
from apifast.router.token_count import ensure_key_usable, input_token_count

api = APIRouter(tags=["responses"])

_RESPONSES_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["input"],
                    "anyOf": OPENAPI_MODEL_REQUIRED,
                    "properties": {
                        "model": {"type": "string"},
                        "input": {},
                        "instructions": {"type": "string"},
                        "max_output_tokens": {"type": "integer", "minimum": 1},
                        "stream": {"type": "boolean"},
                        "store": {"type": "boolean"},
                        **OPENAPI_PROPERTIES,
                    },
                }
            }
        },
    }
}


@api.post("/v1/responses", openapi_extra=_RESPONSES_SCHEMA)
async def create_response(request: Request) -> Response:
    # The server normally answers this path in router/fast_path.py, without the framework;
    # this route serves the OpenAPI schema and any request the fast path passes on.
    state: RouterState = request.app.state.apifast
    started = time.time()
    settings = state.settings
    key_hash = authenticate(state, request.headers.get("authorization"))
    raw = await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
    reply = await handle_response(state, key_hash, raw, started)
    return framework_response(reply)


async def handle_response(state: RouterState, key_hash: bytes, raw: bytes, started: float) -> Reply:
    """Parse, translate and hand over to the core; raises ApiError on refusal."""
    body = parse_json_object(raw)
    model, choice = resolve_request(state, body, "chat")
    chat, _ = chat_body(body)  # also refuses what no route can serve (state, built-in tools)
    gen = Generation.translated(
        chat,
        "responses",
        len(raw),
        native_body(body),
        native_bound="max_output_tokens",
        native_only=native_only_fields(body),
        native_min=RESPONSES_MIN_OUTPUT,
    )
    renderer = ResponsesRenderer(model.id, started, request_echo(body))
    return await generate(state, key_hash, model, gen, renderer, started, choice)


@api.post("/v1/responses/input_tokens")
async def count_input_tokens(request: Request) -> Response:
    """{"object": "response.input_tokens", "input_tokens": N}, as OpenAI's endpoint of that
    name answers: the first route's upstream count where its provider has one, else
    ApiFast's estimate (router/token_count.py). Free: no hold, no usage event."""
    state: RouterState = request.app.state.apifast
    settings = state.settings
    key_hash = authenticate(state, request.headers.get("authorization"))
    raw = await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
    body = parse_json_object(raw)
    # `models` / `route` as the request takes them: what it refuses, the count refuses;
    # the count is for the first model the request would try.
    model, _ = resolve_request(state, body, "chat")
    chat, _ = chat_body({**body, "stream": False})  # the same 400s as a request would get
    # The key's refusals where the request's hold would give them: after the body's.
    await ensure_key_usable(state, key_hash, model.id)
    native = ("responses", native_body(body))
    count = await input_token_count(state, model, chat, len(raw), native)
    out = {"object": "response.input_tokens", "input_tokens": count}
    return Response(orjson.dumps(out), media_type="application/json")


@api.get("/v1/responses/{response_id}")
async def get_response(response_id: str) -> Response:
    raise ApiError(
        404,
        f"Response '{response_id}' is not stored: ApiFast never stores prompts or responses, "
        "so a response can be read only from the answer to its request.",
        code="response_not_stored",
    )


@api.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str) -> Response:
    raise ApiError(
        404,
        f"Response '{response_id}' is not stored: ApiFast never stores responses.",
        code="response_not_stored",
    )
