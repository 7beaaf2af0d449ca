"""POST /v1/chat/completions, streaming and not: the OpenAI chat adapter over the core."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from apifast.auth import key_hash_from_request
from apifast.providers import Usage
from apifast.request_body import parse_json_object, read_body
from apifast.router.call_ids import own_chat_call_ids
from apifast.router.core import generate
from apifast.router.core_types import Generation, Reply
from apifast.router.framework_reply import framework_response
from apifast.router.openai_shape import (
    DONE,
    chunk_bytes,
    clean_choices,
    completion_body,
    error_event_bytes,
    plain_choices,
    usage_chunk_bytes,
)
from apifast.router.prompt_bound import prompt_token_bound
from apifast.router.route_prefs import (
    OPENAPI_MODEL_REQUIRED,
    OPENAPI_PROPERTIES,
    resolve_request,
)
from apifast.router.state import RouterState
from apifast.router.validation import upstream_body, validate_chat

api = APIRouter(tags=["chat"])

_CHAT_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["messages"],
                    "anyOf": OPENAPI_MODEL_REQUIRED,
                    "properties": {
                        "model": {"type": "string"},
                        "messages": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["role"],
                                "properties": {
                                    "role": {"type": "string"},
                                    "content": {},
                                },
                            },
                        },
                        "stream": {"type": "boolean"},
                        "max_tokens": {"type": "integer", "minimum": 1},
                        "max_completion_tokens": {"type": "integer", "minimum": 1},
                        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                        "n": {"type": "integer", "minimum": 1, "maximum": 128},
                        **OPENAPI_PROPERTIES,
                    },
                }
            }
        },
    }
}


class ChatRenderer:
    """Answers in OpenAI's chat-completions shape, under ApiFast's id and public model."""

    __slots__ = ("_calls", "created", "generation_id", "include_usage", "model")

    def __init__(self, model: str, started: float, include_usage: bool) -> None:
        self.generation_id = ""
        self.model = model
        self.created = int(started)
        self.include_usage = include_usage
        self._calls: dict[tuple[Any, Any], str] | None = None  # tool calls renamed so far

    def completion(self, upstream: dict[str, Any], usage: Usage, cost: Decimal) -> bytes:
        own_chat_call_ids(upstream.get("choices"), "message", {}, self.generation_id)
        return completion_body(upstream, self.generation_id, self.model, usage, cost, self.created)

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        choices = chunk.get("choices")
        # The usual text chunk goes as it is; only another can have tool calls to rename.
        if type(choices) is not list or not plain_choices(choices):
            if type(choices) is list and any(map(_has_calls, choices)):
                if self._calls is None:
                    self._calls = {}
                own_chat_call_ids(choices, "delta", self._calls, self.generation_id)
            choices = clean_choices(choices)
        return chunk_bytes(choices, self.generation_id, self.model, self.created)

    def stream_end(self, usage: Usage, cost: Decimal) -> bytes:
        if not self.include_usage:
            return DONE
        end = usage_chunk_bytes(self.generation_id, self.model, self.created, usage, cost)
        return end + DONE

    def stream_error(self, status: int) -> bytes:
        return error_event_bytes("The model provider's stream failed.", status)


def _has_calls(choice: Any) -> bool:
    delta = choice.get("delta") if isinstance(choice, dict) else None
    return isinstance(delta, dict) and "tool_calls" in delta


@api.post("/v1/chat/completions", openapi_extra=_CHAT_BODY_SCHEMA)
async def chat_completions(request: Request) -> Response:
    # The server normally answers this path in router/fast_path.py, without the framework;
    # this route serves the OpenAPI schema and any request the fast path passes on.
    state: RouterState = request.app.state.apifast
    started = time.time()
    key_hash = key_hash_from_request(request, state.secret)
    raw = await read_body(
        request, state.settings.max_body_bytes, state.settings.body_read_timeout_s
    )
    reply = await handle_chat(state, key_hash, raw, started)
    return framework_response(reply)


async def handle_chat(state: RouterState, key_hash: bytes, raw: bytes, started: float) -> Reply:
    """Parse, resolve and hand over to the core; raises ApiError on refusal."""
    body = parse_json_object(raw)
    model, choice = resolve_request(state, body, "chat")
    stream, include_usage, asked, n = validate_chat(body)
    gen = Generation(
        body=upstream_body(body, ""),
        stream=stream,
        input_bound=prompt_token_bound(body),
        max_output=asked,
        n=n,
        input_bytes=len(raw),
    )
    renderer = ChatRenderer(model.id, started, include_usage)
    return await generate(state, key_hash, model, gen, renderer, started, choice)
