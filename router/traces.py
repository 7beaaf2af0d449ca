"""The request core's tracing glue (apifast/tracing.py), called only when tracing is on.

A request's trace: its root span (`POST /v1/...`, made by the composition root), then `hold`,
one `upstream` span per route tried (for a stream, up to its first chunk), and `publish`
(the usage event handed to the publisher, which sends it to NATS off the request path). The
root span gets the request's summary: public model id, protocol, status, outcome, token
counts and the index of the route that served it. Nothing else of the event (its key hash,
the upstream's model or provider) goes into a span.
"""

from __future__ import annotations

from collections.abc import Callable

from apifast.catalog.toml import Model, Route
from apifast.metering.event import UsageEvent
from apifast.tracing import Tracer


def publish(
    tracer: Tracer, event: UsageEvent, model: Model, route: Route | None,
    submit: Callable[[UsageEvent], None],
) -> None:  # fmt: skip
    """Annotate the request's span with its summary, and hand the event over in `publish`."""
    usage = event.usage
    tracer.annotate({
        "apifast.model": event.model,
        "apifast.api": event.api,
        "apifast.endpoint": event.endpoint,
        "apifast.stream": event.stream,
        "apifast.status": event.status,
        "apifast.outcome": event.outcome,
        "apifast.route": model.routes.index(route) if route in model.routes else -1,
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
        "apifast.usage.cached_tokens": usage.cached_tokens,
        "apifast.usage.estimated": event.usage_estimated,
        "apifast.ttft_ms": event.ttft_ms,
    })  # fmt: skip
    with tracer.span("publish", {"apifast.checkpoint": event.checkpoint}):
        submit(event)
