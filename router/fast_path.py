"""POST /v1/chat/completions, /v1/messages and /v1/responses answered straight from ASGI,
without the framework's routing, middleware and response classes, which cost more CPU than
the proxying itself.

The work is the adapters' (`chat.handle_chat`, `messages.handle_message`,
`responses.handle_response`), shared with the FastAPI routes (which still serve the
OpenAPI schema). Answers are byte-for-byte those of the routes: the same
statuses, headers and bodies, and a client that disconnects mid-stream is billed for what
it received.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from apifast.auth import key_hash_from_header
from apifast.errors import ApiError, internal_error
from apifast.request_body import read_asgi_body
from apifast.router.chat import handle_chat
from apifast.router.core_types import Reply
from apifast.router.messages import authorization_from, handle_message
from apifast.router.refusals import API_OF_PATH, count_refused
from apifast.router.relay import next_step
from apifast.router.responses import handle_response
from apifast.router.state import RouterState

_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"
Handler = Callable[[RouterState, bytes, bytes, float], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    handle: Handler
    anthropic: bool = False  # Anthropic's error shape, and its x-api-key header


ENDPOINTS = {
    "/v1/chat/completions": Endpoint(handle_chat),
    "/v1/messages": Endpoint(handle_message, anthropic=True),
    "/v1/responses": Endpoint(handle_response),
}


def handles(scope: Scope) -> bool:
    return bool(
        scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ENDPOINTS
    )


async def serve(state: RouterState, scope: Scope, receive: Receive, send: Send) -> None:
    started = time.time()
    path = scope["path"]
    endpoint = ENDPOINTS[path]
    authorization = x_api_key = content_length = None
    for name, value in scope["headers"]:
        # First occurrence wins, as with Starlette's Headers.get().
        if name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif name == b"content-length":
            if content_length is None:
                content_length = value.decode("latin-1")
        elif name == b"x-api-key" and x_api_key is None and endpoint.anthropic:
            x_api_key = value.decode("latin-1")
    raw = b""
    try:
        if endpoint.anthropic:
            authorization = authorization_from(x_api_key, authorization)
        key_hash = key_hash_from_header(authorization, state.secret)
        settings = state.settings
        raw = await read_asgi_body(
            content_length, receive, settings.max_body_bytes, settings.body_read_timeout_s
        )
        reply = await endpoint.handle(state, key_hash, raw, started)
    except ApiError as exc:
        count_refused(state, API_OF_PATH[path], exc, raw)
        await exc.response(endpoint.anthropic)(scope, receive, send)
        return
    except ClientDisconnect:
        return
    except Exception as exc:
        error = internal_error(exc, "POST", path)
        count_refused(state, API_OF_PATH[path], error, raw)
        await error.response(endpoint.anthropic)(scope, receive, send)
        return
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
    if reply.stream is None:
        headers.append((b"content-length", str(len(reply.content)).encode()))
        headers.append((b"content-type", _JSON))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply.content})
        return
    headers.append((b"content-type", _SSE))
    await _relay(reply, headers, receive, send)


async def _relay(
    reply: Reply, headers: list[tuple[bytes, bytes]], receive: Receive, send: Send
) -> None:
    """Send the stream; a client disconnect cancels it at once, wherever it is waiting.

    The disconnect watcher (a task) starts only when the stream first has to wait for the
    upstream: a stream that is all there already is sent without one. The piece yielded
    once `reply.finished` is set is the last, and goes out with the end of the chunked body."""
    stream = reply.stream
    assert stream is not None
    task = asyncio.current_task()
    assert task is not None
    state = {"done": False, "gone": False}
    watcher: asyncio.Future[None] | None = None

    def on_disconnect(watched: asyncio.Future[None]) -> None:
        if not state["done"] and not watched.cancelled():
            state["gone"] = True
            task.cancel()

    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        while True:
            try:
                ready, piece = next_step(stream)
                if not ready:
                    if watcher is None:
                        watcher = asyncio.ensure_future(_disconnected(receive))
                        watcher.add_done_callback(on_disconnect)
                    piece = await piece
            except StopAsyncIteration:
                piece = b""
            last = not piece or reply.finished
            if last:
                # The server reports a disconnect once the response is complete: not a
                # client's.
                state["done"] = True
            await send({"type": "http.response.body", "body": piece, "more_body": not last})
            if last:
                break
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        task.uncancel()
    finally:
        state["done"] = True
        if watcher is not None:
            watcher.cancel()
        # Settles the request (billing what was delivered) if the stream did not finish.
        await stream.aclose()  # type: ignore[attr-defined]


async def _disconnected(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
