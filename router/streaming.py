"""Relaying a streamed answer: open the stream on the routes (falling back only before its
first chunk), then relay it through the renderer in bursts, with keep-alives during an
upstream silence and usage checkpoints on the event path, and finish the request once at its
end, on an upstream error or on a client disconnect (billing what was delivered)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from apifast.catalog.toml import Model, Route
from apifast.metering.event import UsageEvent
from apifast.providers import (
    ChatRequest,
    NativeRequest,
    PartialUsage,
    Provider,
    StreamItem,
    UpstreamError,
    UpstreamTimeout,
    Usage,
)
from apifast.router.billed_usage import count_bounds, delta_chars, estimate_delivered, sane_usage
from apifast.router.core_types import Generation, NativeRenderer, Renderer, Reply, speaks_native
from apifast.router.finishing import finish, price
from apifast.router.relay import Waiting, close_quietly, next_step
from apifast.router.route_calls import RoutesFailed, call_routes, record_route
from apifast.router.state import RouterState

if TYPE_CHECKING:
    from apifast.router.core import Routing


log = logging.getLogger("apifast.router")
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _resolved(waiting: Waiting) -> tuple[bool, Any]:
    """(True, item) when the step produced one, (False, None) at the stream's end."""
    try:
        return True, await waiting
    except StopAsyncIteration:
        return False, None


async def relay_stream(
    state: RouterState,
    model: Model,
    ubody: dict[str, Any],
    event: UsageEvent,
    gen: Generation,
    renderer: Renderer,
    headers: dict[str, str],
    max_output: int,
    routing: Routing,
) -> Reply:
    native = [False]

    async def open_stream(
        provider: Provider, route: Route
    ) -> tuple[AsyncIterator[StreamItem], StreamItem]:
        native[0] = speaks_native(provider, gen)
        if native[0]:
            body = {**(gen.native or {}), "model": route.model, "stream": True}
            upstream = provider.stream_native(NativeRequest(gen.api, body, route.model, True))
        else:
            request = ChatRequest(
                body={**ubody, "model": route.model}, model=route.model, stream=True
            )
            upstream = provider.stream_chat(request)
        iterator = upstream.__aiter__()
        try:
            # Fallback is only possible before the first byte reaches the client.
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise UpstreamError(None, "empty stream") from None
        except BaseException:
            await close_quietly(iterator)
            raise
        return iterator, first

    traced = (
        open_stream if state.tracer is None else state.tracer.upstream(model.routes, open_stream)
    )
    try:
        (iterator, first), entry = await call_routes(
            state, model, traced, routing.budget, routing.strategy, routing.skip
        )
    except RoutesFailed as failed:
        raise routing.fail(state, event, model, failed) from None
    route = entry.route
    record_route(event, entry, routing.budget)
    book = state.routes
    first_byte = book.clock()

    reply = Reply({**STREAM_HEADERS, **headers})
    tally = [0, 0]  # content chars, content pieces
    upstream_usage: list[Usage] = []
    finished = [False]
    input_bytes = gen.input_bytes
    bounds = count_bounds(model.context_window, gen.n)

    def delivered() -> tuple[Usage, bool]:
        """The usage so far: the upstream's if it reported one, else the estimate."""
        last = upstream_usage[-1] if upstream_usage else None
        usage = sane_usage(last, bounds)
        partial = type(last) is PartialUsage
        # Only a usage reported at a stream's end is final. Before it (a PartialUsage, or a
        # stream the upstream broke off) the input is known but the output only a floor.
        if usage is not None and event.outcome == "ok" and not partial:
            return usage, False
        estimate = estimate_delivered(input_bytes, tally[0], tally[1], max_output)
        if usage is None:
            return estimate, True
        output = max(usage.output_tokens, estimate.output_tokens)
        if output == usage.output_tokens and not partial:
            return usage, False
        u = usage
        return Usage(u.input_tokens, output, u.cached_tokens, u.cache_write_tokens,
                     u.reasoning_tokens), True  # fmt: skip

    def settle() -> None:
        if finished[0]:
            return
        finished[0] = True
        event.usage, event.usage_estimated = delivered()
        book.release(entry, event.usage.output_tokens, book.clock() - first_byte)
        finish(state, event, model, route)

    every = state.settings.stream_checkpoint_s
    checkpoints: list[float] = [0, time.monotonic() + every]  # published, next one due

    def checkpoint() -> None:
        # What the stream has delivered, through the event path: if this router dies, the
        # meter bills the latest checkpoint once the hold expires (docs/billing.md).
        checkpoints[0] += 1
        checkpoints[1] = time.monotonic() + every
        usage, estimated = delivered()
        copy = dataclasses.replace(
            event, usage=usage, usage_estimated=estimated, outcome="router_lost",
            checkpoint=int(checkpoints[0]),
            latency_ms=max(1, round((time.time() - event.started_at) * 1000)),
        )  # fmt: skip
        price(copy, model, route)
        state.publisher.submit(copy)

    async def body_iter() -> AsyncIterator[bytes]:
        # One generator for the whole relay: a nested one would cost a frame per chunk.
        # Chunks the upstream delivered together go out together: each piece yielded is
        # everything available before the next wait on the upstream.
        event.outcome = "client_disconnect"  # until the stream is seen to the end
        item: StreamItem = first
        render_chunk: Callable[[dict[str, Any]], bytes] = renderer.chunk
        chars_of: Callable[[dict[str, Any]], int] = delta_chars
        if native[0]:
            relay: NativeRenderer = renderer  # type: ignore[assignment]
            render_chunk, chars_of = relay.native_chunk, relay.native_chars
        burst: list[bytes] = []
        waiting: Waiting | None = None
        # Only protocols with a keep-alive wait in a task (the others await in place, the
        # cheaper way): a task can be waited on with a timeout, a ping sent, and waited on.
        keepalive = hasattr(renderer, "keepalive")
        ping_s = state.settings.stream_ping_s
        waiter: asyncio.Future[tuple[bool, Any]] | None = None
        try:
            try:
                while True:
                    if isinstance(item, Usage):
                        upstream_usage.append(item)
                    else:
                        if not event.ttft_ms:
                            event.ttft_ms = round((time.time() - event.started_at) * 1000)
                        chars = chars_of(item)
                        if chars:
                            tally[0] += chars
                            tally[1] += 1
                        piece = render_chunk(item)
                        if piece:
                            burst.append(piece)
                    try:
                        ready, step = next_step(iterator)
                        if not ready:
                            if every and time.monotonic() >= checkpoints[1]:
                                checkpoint()
                            if burst:
                                waiting = step
                                yield b"".join(burst)
                                burst = []
                            waiting = None
                            if keepalive and ping_s:
                                waiter = asyncio.ensure_future(_resolved(step))
                                while not (await asyncio.wait((waiter,), timeout=ping_s))[0]:
                                    ping = renderer.keepalive  # type: ignore[attr-defined]
                                    if ping:
                                        yield ping
                                more, step = waiter.result()
                                waiter = None
                                if not more:
                                    break
                            else:
                                step = await step
                    except StopAsyncIteration:
                        waiting = None
                        break
                    item = step
                event.outcome = "ok"
            except Exception as exc:
                waiting = None
                if not isinstance(exc, UpstreamError):
                    # A chunk the relay cannot read (a field of the wrong type): the stream
                    # ends as an upstream failure does, with the protocol's error event,
                    # not cut by an unhandled exception whose text could echo content.
                    log.warning("model %s route %d: unreadable stream data (%s)",
                                model.id, entry.index, type(exc).__name__)  # fmt: skip
                    exc = UpstreamError(502, "unreadable stream data", cause="protocol")
                book.broke(model.id, entry, exc)  # never retried: the client has data
                event.outcome = "upstream_error"
                event.status = 504 if isinstance(exc, UpstreamTimeout) else 502
                burst.append(renderer.stream_error(event.status))
            settle()
            burst.append(renderer.stream_end(event.usage, event.cost_usd))
            reply.finished = True
            yield b"".join(burst)
        finally:
            # Runs on a client disconnect too: bill what was delivered, close the upstream.
            settle()
            if waiting is not None:
                waiting.abandon()
            if waiter is not None:  # the client left during a silence: stop the wait first
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
            await close_quietly(iterator, shield=True)

    reply.stream = body_iter()
    return reply
