"""POST /v1/embeddings: the OpenAI embeddings adapter over the core, with the client's
routing preferences (`models`, `route`) as chat takes them (router/route_prefs.py)."""

from __future__ import annotations

import time

from fastapi import APIRouter
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from apifast.auth import key_hash_from_request
from apifast.errors import ApiError
from apifast.request_body import parse_json_object, read_body
from apifast.router.core import RECEIPT_HEADER
from apifast.router.embedding_core import embed
from apifast.router.openai_shape import embeddings_body
from apifast.router.refusals import count_refused
from apifast.router.route_prefs import (
    OPENAPI_MODEL_REQUIRED,
    OPENAPI_PROPERTIES,
    resolve_request,
)
from apifast.router.state import RouterState
from apifast.router.validation import upstream_body, validate_embeddings

api = APIRouter(tags=["embeddings"])

_EMBEDDINGS_SCHEMA = {
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
                        **OPENAPI_PROPERTIES,
                    },
                }
            }
        },
    }
}


@api.post("/v1/embeddings", openapi_extra=_EMBEDDINGS_SCHEMA)
async def embeddings(request: Request) -> Response:
    state: RouterState = request.app.state.apifast
    started = time.time()
    raw = b""
    try:
        key_hash = key_hash_from_request(request, state.secret)
        raw = await read_body(
            request, state.settings.max_body_bytes, state.settings.body_read_timeout_s
        )
        body = parse_json_object(raw)
        # The model(s) first, before the body, in chat's order (404 unknown, 400 wrong kind).
        model, choice = resolve_request(state, body, "embeddings")
        validate_embeddings(body)
        # Input tokens are bounded by the body's bytes (a token covers at least one byte).
        embedded = await embed(
            state, key_hash, model, upstream_body(body, ""), len(raw), started, choice
        )
    except ApiError as exc:
        count_refused(state, "embeddings", exc, raw)
        raise
    except ClientDisconnect:
        raise
    except Exception:  # answered with a bare 500 (apifast/errors.py)
        count_refused(state, "embeddings", 500, raw)
        raise
    usage = embedded.result.usage
    assert usage is not None  # embed() puts the billed usage there
    # `model`: the public model that answered (of the client's `models`, maybe not the first).
    content = embeddings_body(embedded.result.body, embedded.model.id, usage, embedded.cost)
    headers = {RECEIPT_HEADER: embedded.receipt} if embedded.receipt else None
    return Response(content, media_type="application/json", headers=headers)
