"""The one request-body reader (FastAPI and raw ASGI) and the JSON-object parse."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from apifast.errors import ApiError


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")


def too_slow(timeout_s: float) -> ApiError:
    return ApiError(
        408, f"the request body did not arrive within {timeout_s:g} s", code="body_timeout"
    )


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body of a FastAPI request: 413 beyond `limit` bytes, 408 if it takes longer
    than `timeout_s` (a client trickling its body must not hold a connection for ever)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise too_slow(timeout_s) from None
    return b"".join(chunks)


async def read_asgi_body(
    content_length: str | None, receive: Receive, limit: int, timeout_s: float
) -> bytes:
    """`read_body` for a raw ASGI request; raises ClientDisconnect if the client goes away."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise too_large(limit)
    # A bare timer rather than asyncio.timeout(), which costs ~4 us on every request: the
    # body has almost always arrived with the headers, and the timer never fires.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = loop.call_later(timeout_s, expire)
    try:
        return await _receive_body(receive, limit)
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            raise too_slow(timeout_s) from None
        raise  # cancelled from outside (a shutdown), or as well as expired
    finally:
        timer.cancel()


async def _receive_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the usual case: the whole body in one message
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


# Deeper nesting is refused: no API field needs it, and serialising it again for the
# upstream would fail (orjson stops at 255 levels) after the hold was taken.
MAX_JSON_DEPTH = 64


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    # Only a body with that many brackets at all can be that deep: the usual one skips the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(body) > MAX_JSON_DEPTH:
        raise ApiError(
            400,
            f"request body is nested deeper than {MAX_JSON_DEPTH} levels",
            code="invalid_json",
        )
    return body


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest
