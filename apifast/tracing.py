"""OpenTelemetry traces, exported over OTLP/HTTP (protobuf) when `APIFAST_OTEL_ENDPOINT` is set.

Off by default, and then free: the lifespan makes no `Tracer`, `RouterState.tracer` and
`Meter.tracer` stay None, and every hook on the request path sits behind that one check (no
no-op spans). The SDK and the exporter (the `otel` extra) are imported only when tracing is
on. One tracer provider per process, owned by the lifespan (no global provider is set) and
shut down, flushing what is queued, on exit.

What a span may carry: the public model id, the protocol, statuses and outcomes, token
counts, the route's index in the model's catalog entry, counts and durations. Never content,
a key or its hash, an IP, an upstream's model or provider name, or an exception's text (an
upstream error may echo the prompt): a failure is recorded by its class or error code only.
No trace context is read from clients or sent upstream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from apifast import __version__
from apifast.errors import ApiError
from apifast.providers import UpstreamError

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")
Attributes = Mapping[str, str | int | float | bool]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

_TRACES_PATH = "/v1/traces"


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(_TRACES_PATH) else endpoint + _TRACES_PATH


def _error_class(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return exc.code or str(exc.status)
    return type(exc).__name__


class Tracer:
    """The process's tracer: an SDK provider with a batching OTLP/HTTP exporter."""

    def __init__(self, endpoint: str, service: str) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise RuntimeError(
                "APIFAST_OTEL_ENDPOINT is set but OpenTelemetry is not installed: "
                "pip install 'apifast[otel]'"
            ) from exc
        self._trace = trace
        self._error = trace.StatusCode.ERROR
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._invalid = trace.INVALID_SPAN
        resource = Resource.create({"service.name": service, "service.version": __version__})
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint)))
        )
        self._tracer = self._provider.get_tracer("apifast", __version__)

    def shutdown(self) -> None:
        """Export what is queued, then stop (blocking: run it off the event loop)."""
        self._provider.shutdown()

    @contextmanager
    def span(
        self, name: str, attributes: Attributes | None = None, client: bool = False
    ) -> Iterator[Any]:
        """A child of the current span; an exception marks it failed, by class only."""
        parent = self._trace.get_current_span()
        if parent is not self._invalid and not parent.is_recording():
            # A request the sampler dropped (OTEL_TRACES_SAMPLER): its steps make no span.
            yield parent
            return
        kind = self._client if client else self._trace.SpanKind.INTERNAL
        with self._tracer.start_as_current_span(
            name, kind=kind, attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        ) as span:  # fmt: skip
            try:
                yield span
            except BaseException as exc:
                span.set_status(self._error)
                span.set_attribute("error.type", _error_class(exc))
                raise

    async def within(
        self, name: str, step: Awaitable[T], attributes: Attributes | None = None
    ) -> T:
        """Await `step` inside a span `name`."""
        with self.span(name, attributes):
            return await step

    def annotate(self, attributes: Attributes) -> None:
        """Set attributes on the current span (the request's, in the request core)."""
        self._trace.get_current_span().set_attributes(attributes)

    def upstream(
        self, routes: Sequence[R], call: Callable[[P, R], Awaitable[T]]
    ) -> Callable[[P, R], Awaitable[T]]:
        """`call` (one route's attempt) inside an `upstream` span per attempt, named by the
        route's index in `routes`; a failure by its status and cause class."""

        async def traced(provider: P, route: R) -> T:
            with self.span("upstream", {"apifast.route": routes.index(route)}, client=True) as s:
                try:
                    return await call(provider, route)
                except UpstreamError as exc:
                    s.set_attribute("apifast.upstream.status", exc.status or 0)
                    s.set_attribute("apifast.upstream.cause", exc.cause)
                    raise

        return traced

    async def request(self, name: str, app: ASGIApp, scope: Any, receive: Any, send: Any) -> None:
        """Serve one HTTP request inside its root span (the method and route only: no
        address, header or query)."""
        status = [0]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        attributes = {"http.request.method": scope["method"], "http.route": scope["path"]}
        with self._tracer.start_as_current_span(
            name, kind=self._server, attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        ) as span:  # fmt: skip
            try:
                await app(scope, receive, sending)
            except BaseException as exc:
                span.set_status(self._error)
                span.set_attribute("error.type", _error_class(exc))
                raise
            finally:
                span.set_attribute("http.response.status_code", status[0])
                if status[0] >= 500:
                    span.set_status(self._error)
