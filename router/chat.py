"""POST /v1/chat/completions, streaming and not."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from apifast.money import quantize_up
from apifast.providers import (
    ChatRequest,
    Provider,
    StreamItem,
    UpstreamError,
    UpstreamTimeout,
    Usage,
)
from router.auth import key_hash_from_request
from router.catalog import Model, Route
from router.openai_shape import (
    DONE,
    chunk_bytes,
    completion_body,
    error_event_bytes,
    usage_chunk_bytes,
)
from router.proxy import (
    RoutesFailed,
    ensure_metering,
    find_model,
    hold_funds,
    new_generation_id,
    read_body,
    try_routes,
    upstream_failure,
)
from router.state import RouterState
from router.usage_event import UsageEvent
from router.validation import model_name, parse_json_object, upstream_body, validate_chat

api = APIRouter(tags=["chat"])

# Per-message chat-template overhead, added to the byte count when bounding input tokens.
_MESSAGE_OVERHEAD_TOKENS = 8
LOWERED_HEADER = "X-ApiFast-Max-Tokens-Lowered"

_CHAT_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model", "messages"],
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
                    },
                }
            }
        },
    }
}


def input_token_bound(raw: bytes, body: dict[str, Any]) -> int:
    """An upper bound of prompt tokens for text: a byte-level BPE token covers >= 1 byte."""
    messages = body.get("messages") or ()
    return len(raw) + _MESSAGE_OVERHEAD_TOKENS * (len(messages) + 1)


def estimate_delivered(raw: bytes, chars: int, pieces: int, max_output: int | None = None) -> Usage:
    """The documented estimate when a stream ends without upstream usage: input is the body
    size / 4, output the larger of the content pieces delivered and delivered chars / 4, but
    never more than the max_tokens sent upstream (the hold covers no more)."""
    output = max(pieces, math.ceil(chars / 4))
    if max_output is not None:
        output = min(output, max_output)
    return Usage(input_tokens=math.ceil(len(raw) / 4), output_tokens=output)


def _delta_chars(chunk: dict[str, Any]) -> int:
    total = 0
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        content = delta.get("content")
        if isinstance(content, str):
            total += len(content)
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                total += len(fn["arguments"])
    return total


@dataclass(slots=True)
class ChatReply:
    """What a chat call answers with 200: a JSON body, or an SSE stream (`stream` is set).
    Iterating `stream` to its end or closing it settles the request."""

    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""
    stream: AsyncIterator[bytes] | None = None


STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@api.post("/v1/chat/completions", openapi_extra=_CHAT_BODY_SCHEMA)
async def chat_completions(request: Request) -> Response:
    # The server normally answers this path in router/fast_path.py, without the framework;
    # this route serves the OpenAPI schema and any request the fast path passes on.
    state: RouterState = request.app.state.apifast
    started = time.time()
    key_hash = key_hash_from_request(request, state.secret)
    raw = await read_body(request, state.settings.max_body_bytes)
    reply = await handle_chat(state, key_hash, raw, started)
    if reply.stream is not None:
        media_type = "text/event-stream"
        return StreamingResponse(reply.stream, media_type=media_type, headers=reply.headers)
    return Response(reply.content, media_type="application/json", headers=reply.headers)


async def handle_chat(state: RouterState, key_hash: bytes, raw: bytes, started: float) -> ChatReply:
    """Everything after authentication and reading the body; raises ApiError on refusal."""
    body = parse_json_object(raw)
    model = find_model(state, model_name(body), "chat")
    stream, include_usage, asked, n = validate_chat(body)
    ensure_metering(state)

    cap = asked or model.max_output_tokens or state.settings.default_max_output_tokens
    if model.max_output_tokens:
        cap = min(cap, model.max_output_tokens)
    input_bound = input_token_bound(raw, body)
    price = model.price
    generation_id = new_generation_id()
    max_usd = quantize_up(price.bound(input_bound, cap * n))
    min_usd = quantize_up(price.bound(input_bound, n))
    hold = await hold_funds(state, key_hash, generation_id, min_usd, max_usd)

    headers: dict[str, str] = {}
    out_tokens = cap
    if hold.reserved < max_usd:
        # The balance covers a shorter answer: lower max_tokens instead of refusing.
        out_tokens = max(
            1, min(cap, price.affordable_output_tokens(hold.reserved, input_bound) // n)
        )
        headers[LOWERED_HEADER] = str(out_tokens)
    ubody = upstream_body(body, "")
    # Always bound the output upstream, so the hold covers the whole answer.
    ubody["max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"] = out_tokens

    event = UsageEvent(
        generation_id=generation_id,
        key_hash=key_hash,
        key_id=hold.key_id,
        model=model.id,
        endpoint="chat",
        stream=stream,
        reserved_usd=hold.reserved,
        started_at=started,
    )
    if stream:
        return await _stream(state, model, ubody, event, raw, include_usage, headers)
    return await _complete(state, model, ubody, event, headers)


def _finish(state: RouterState, event: UsageEvent, model: Model, route: Route | None) -> None:
    """Price the usage and hand the event to the publisher (which never blocks)."""
    if route is not None:
        event.provider = route.provider
        event.upstream_model = route.model
        event.upstream_cost_usd = route.cost.cost(event.usage)
    used = event.usage.input_tokens or event.usage.output_tokens
    # A failed request with no usage costs nothing, not even the per-request price.
    if used or event.outcome != "upstream_error":
        event.cost_usd = model.price.cost(event.usage)
    event.latency_ms = round((time.time() - event.started_at) * 1000)
    state.key_limits.record_tokens(
        event.key_id, event.usage.input_tokens + event.usage.output_tokens
    )
    state.publisher.submit(event)


async def _complete(
    state: RouterState,
    model: Model,
    ubody: dict[str, Any],
    event: UsageEvent,
    headers: dict[str, str],
) -> ChatReply:
    async def call(provider: Provider, route: Route) -> Any:
        return await provider.chat(
            ChatRequest(body={**ubody, "model": route.model}, model=route.model)
        )

    try:
        result, route = await try_routes(state, model, call)
    except RoutesFailed as failed:
        error = upstream_failure(failed.last)
        event.status, event.outcome = error.status, "upstream_error"
        _finish(state, event, model, failed.route)
        raise error from None
    event.usage = result.usage
    event.ttft_ms = round((time.time() - event.started_at) * 1000)
    _finish(state, event, model, route)
    content = completion_body(
        result.body, event.generation_id, model.id, result.usage, event.cost_usd
    )
    return ChatReply(headers, content)


async def _stream(
    state: RouterState,
    model: Model,
    ubody: dict[str, Any],
    event: UsageEvent,
    raw: bytes,
    include_usage: bool,
    headers: dict[str, str],
) -> ChatReply:
    async def open_stream(
        provider: Provider, route: Route
    ) -> tuple[AsyncIterator[StreamItem], StreamItem]:
        request = ChatRequest(body={**ubody, "model": route.model}, model=route.model, stream=True)
        iterator = provider.stream_chat(request).__aiter__()
        try:
            # Fallback is only possible before the first byte reaches the client.
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise UpstreamError(None, "empty stream") from None
        except BaseException:
            await _close_quietly(iterator)
            raise
        return iterator, first

    try:
        (iterator, first), route = await try_routes(state, model, open_stream)
    except RoutesFailed as failed:
        error = upstream_failure(failed.last)
        event.status, event.outcome = error.status, "upstream_error"
        _finish(state, event, model, failed.route)
        raise error from None

    created = int(event.started_at)
    tally = {"chars": 0, "pieces": 0}
    upstream_usage: list[Usage] = []
    finished = [False]

    def settle() -> None:
        if finished[0]:
            return
        finished[0] = True
        if upstream_usage:
            event.usage = upstream_usage[-1]
        else:
            sent_cap = ubody.get("max_completion_tokens") or ubody.get("max_tokens")
            max_output = sent_cap * (ubody.get("n") or 1) if isinstance(sent_cap, int) else None
            event.usage = estimate_delivered(raw, tally["chars"], tally["pieces"], max_output)
            event.usage_estimated = True
        _finish(state, event, model, route)

    async def body_iter() -> AsyncIterator[bytes]:
        # One generator for the whole relay: a nested one would cost a frame per chunk.
        # Chunks the upstream delivered together go out together: each piece yielded is
        # everything available before the next wait on the upstream.
        event.outcome = "client_disconnect"  # until the stream is seen to the end
        item: StreamItem = first
        generation_id, public_model = event.generation_id, model.id
        burst: list[bytes] = []
        waiting: _Waiting | None = None
        try:
            try:
                while True:
                    if isinstance(item, Usage):
                        upstream_usage.append(item)
                    else:
                        if not event.ttft_ms:
                            event.ttft_ms = round((time.time() - event.started_at) * 1000)
                        chars = _delta_chars(item)
                        if chars:
                            tally["chars"] += chars
                            tally["pieces"] += 1
                        burst.append(chunk_bytes(item, generation_id, public_model, created))
                    try:
                        ready, step = next_step(iterator)
                        if not ready:
                            if burst:
                                waiting = step
                                yield b"".join(burst)
                                burst = []
                            waiting = None
                            step = await step
                    except StopAsyncIteration:
                        waiting = None
                        break
                    item = step
                event.outcome = "ok"
            except UpstreamError as exc:
                waiting = None
                event.outcome = "upstream_error"
                event.status = 504 if isinstance(exc, UpstreamTimeout) else 502
                burst.append(error_event_bytes("The model provider's stream failed.", event.status))
            settle()
            if include_usage:
                usage, cost = event.usage, event.cost_usd
                burst.append(usage_chunk_bytes(generation_id, public_model, created, usage, cost))
            burst.append(DONE)
            yield b"".join(burst)
        finally:
            # Runs on a client disconnect too: bill what was delivered, close the upstream.
            settle()
            if waiting is not None:
                waiting.abandon()
            await _close_quietly(iterator, shield=True)

    return ChatReply({**STREAM_HEADERS, **headers}, stream=body_iter())


class _Waiting:
    """An `__anext__()` step that was started and is waiting on something (`signal`, what it
    yielded to the event loop). Awaiting this carries on exactly where it stopped."""

    __slots__ = ("signal", "step")

    def __init__(self, step: Any, signal: Any) -> None:
        self.step = step
        self.signal = signal

    def __await__(self) -> Generator[Any, Any, Any]:
        # `yield from step`, minus its first yield, which `next_step` already took.
        step, signal = self.step, self.signal
        while True:
            try:
                sent = yield signal
            except BaseException as exc:  # cancellation and the like go into the step
                try:
                    signal = step.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    signal = step.send(sent)
                except StopIteration as stop:
                    return stop.value

    def abandon(self) -> None:
        """Unwind the step (its generator's `finally` blocks run); needed before `aclose()`."""
        try:
            self.step.throw(GeneratorExit)
        except BaseException:  # whatever it ends with, it has ended
            pass


def next_step(iterator: AsyncIterator[Any]) -> tuple[bool, Any]:
    """Start `iterator.__anext__()`: (True, item) if it produced one without waiting, else
    (False, a `_Waiting` to await). StopAsyncIteration and upstream errors propagate."""
    step = iterator.__anext__()
    try:
        signal = step.send(None)  # type: ignore[attr-defined]
    except StopIteration as done:
        return True, done.value
    return False, _Waiting(step, signal)


async def _close_quietly(iterator: AsyncIterator[StreamItem], *, shield: bool = False) -> None:
    """Close the upstream stream. With `shield`, a cancellation cannot cut the close short;
    a close that finishes without waiting (the usual case) needs no shield, which is costly."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    try:
        step = aclose()
        try:
            signal = step.send(None)
        except (StopIteration, StopAsyncIteration):
            return
        if shield:
            with anyio.CancelScope(shield=True):
                await _Waiting(step, signal)
        else:
            await _Waiting(step, signal)
    except Exception:  # the upstream connection is being dropped anyway
        pass
