"""Counting the inference requests that end without being finished (refused before or at
their hold: 400, 401, 402, 403, 404, 413, 429, 503; or an unexpected 500) in
`apifast_requests_total`, beside the finished ones (router/finishing.py). It runs only where
the error answer is built, never on a request that succeeds.

The model label is the public model the body names when the catalog has it, else "": never
a string a client made up, so the series stay as few as the catalog's models."""

from __future__ import annotations

import orjson

from apifast.errors import ApiError
from apifast.router.state import RouterState

# The protocol label of each inference path, as the finished requests carry it.
API_OF_PATH = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "messages",
    "/v1/responses": "responses",
    "/v1/embeddings": "embeddings",
}


def count_refused(state: RouterState, api: str, error: ApiError | int, body: bytes = b"") -> None:
    """Count one request answered with `error` (an ApiError, or a bare status), unless it was
    finished and so counted already (a failed upstream: `route_calls.finish_failed`)."""
    metrics = state.metrics
    if metrics is None:
        return
    if isinstance(error, ApiError):
        if error.counted:
            return
        status = error.client_status(api == "messages")  # what the client saw
    else:
        status = error
    metrics.requests.labels(_public_model(state, body), api, str(status)).inc()


def _public_model(state: RouterState, body: bytes) -> str:
    if not body:
        return ""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    name = parsed.get("model") if isinstance(parsed, dict) else None
    if not isinstance(name, str):
        return ""
    model = state.catalog.get(name)
    return model.id if model is not None else ""
