"""Prometheus metrics, served on their own listen address (`APIFAST_METRICS_LISTEN`), never
on the public port.

One `Metrics` per process, made by the composition root (no module-level registry). Labels
are models, protocols, statuses, reasons and provider names only: never a key, a key hash,
an IP or any content. Costs are exported as float dollar series for dashboards: the ledger,
not these, is the account.

With several workers (`APIFAST_WORKERS` > 1) one listener serves them all: `apifast serve`
sets prometheus_client's multiprocess directory (PROMETHEUS_MULTIPROC_DIR) before the
workers start (`workers_metrics`), each worker writes its series to its own files there, and
the parent process serves their merge. A worker then opens no listener (a second bind of
the port would kill it), and its gauges are refreshed from their sources every second.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when it is imported
_REFRESH_S = 1.0  # how often a worker writes its watched gauges to its files


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # The series go to the multiprocess directory (a worker of several), not to memory.
    shared: bool = field(init=False)
    _watched: list[tuple[Gauge, Callable[[], float]]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.shared = values.ValueClass is not values.MutexValue
        r = self.registry
        self.requests = Counter(
            "apifast_requests",
            'Inference requests that ended, refused ones too, by public model ("" when the '
            "catalog has none by the name asked), protocol and status",
            ["model", "api", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "apifast_request_seconds", "Request start to last byte", ["model", "api"],
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.ttfb = Histogram(
            "apifast_time_to_first_byte_seconds", "Request start to the upstream's first byte",
            ["model", "api"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.overhead = Histogram(
            "apifast_added_seconds",
            "ApiFast's own time in a non-streaming request: total less the upstream call",
            ["api"], buckets=_OVERHEAD, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "apifast_tokens", "Tokens billed, by model and kind (input, output)",
            ["model", "kind"], registry=r,
        )  # fmt: skip
        self.cost = Counter("apifast_cost_usd", "Cost billed to keys", ["model"], registry=r)
        self.hold_refusals = Counter(
            "apifast_hold_refusals", "Holds refused, by reason", ["reason"], registry=r
        )
        self.lease_growths = Counter(
            "apifast_lease_growths", "Balance leases taken or grown", ["result"], registry=r
        )
        # With several workers: a gauge of this router is the sum (or max) of its workers'.
        self.leases = Gauge(
            "apifast_leases", "Balance leases this router holds", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.upstream_errors = Counter(
            "apifast_upstream_errors", "Failed upstream calls, by route and cause",
            ["model", "provider", "cause"], registry=r,
        )  # fmt: skip
        self.publish_failures = Counter(
            "apifast_publish_failures", "Usage events that could not be published (spooled)",
            registry=r,
        )  # fmt: skip
        self.spool_events = Gauge(
            "apifast_spool_events", "Usage events waiting in the spool", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.spool_age = Gauge(
            "apifast_spool_age_seconds", "Age of the oldest spooled usage event", registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.meter_events = Counter(
            "apifast_meter_events", "Usage events debited and stored by the meter", registry=r
        )
        self.meter_lag = Gauge(
            "apifast_meter_pending", "Usage events in the stream not yet taken by a meter",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        # Apart from the pending ones, as JetStream counts them: taken but not yet acked is
        # another state (a slow store, a meter that died holding a batch) than not taken.
        self.meter_in_flight = Gauge(
            "apifast_meter_in_flight",
            "Usage events taken by a meter and not yet acked (being metered, or to be "
            "redelivered)",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.store_errors = Counter(
            "apifast_meter_store_errors", "Meter batches that failed, by store", ["store"],
            registry=r,
        )  # fmt: skip
        # Counted by the meter, once per event it debits (never by a router: a router's
        # count and the meter's would add up twice across processes).
        self.upstream_overages = Counter(
            "apifast_upstream_overages",
            "Requests whose upstream-reported usage cost more than their hold (not charged)",
            ["model"], registry=r,
        )  # fmt: skip
        self.upstream_overage_usd = Counter(
            "apifast_upstream_overage_usd",
            "Cost reported by upstreams beyond the requests' holds, absorbed by the operator",
            ["model"], registry=r,
        )  # fmt: skip
        # Known label values exported at 0 from the start, so a rate() alert sees the first.
        for store in ("postgres", "clickhouse"):
            self.store_errors.labels(store)
        for result in ("opened", "grown", "refused"):
            self.lease_growths.labels(result)

    def finished(
        self, model: str, api: str, status: int, started: float, ttft_ms: int,
        input_tokens: int, output_tokens: int, cost: Decimal,
    ) -> None:  # fmt: skip
        """One request ended (router/finishing.finish)."""
        self.requests.labels(model, api, str(status)).inc()
        self.latency.labels(model, api).observe(max(0.0, time.time() - started))
        if ttft_ms:
            self.ttfb.labels(model, api).observe(ttft_ms / 1000)
        if input_tokens:
            self.tokens.labels(model, "input").inc(input_tokens)
        if output_tokens:
            self.tokens.labels(model, "output").inc(output_tokens)
        if cost:
            self.cost.labels(model).inc(float(cost))  # a dashboard series, not the account

    def overage(self, model: str, usd: Decimal) -> None:
        """One debited event's upstream overage (metering/consumer.py)."""
        self.upstream_overages.labels(model).inc()
        self.upstream_overage_usd.labels(model).inc(float(usd))  # a series, not the account

    def watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Read `gauge` from `read` at each scrape; for a worker of several, at each
        refresh (the parent's scrape reads files, not this process)."""
        if self.shared:
            self._watched.append((gauge, read))
        else:
            gauge.set_function(read)

    def refresh(self) -> None:
        for gauge, read in self._watched:
            gauge.set(read())

    async def refresh_while_running(self) -> None:
        """A worker of several: write the watched gauges every second, until cancelled."""
        while True:
            self.refresh()
            await asyncio.sleep(_REFRESH_S)

    def leave(self) -> None:
        """A worker of several, stopping: its gauges stop counting (its counters stay)."""
        if self.shared:
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


class MetricsServer:
    """A registry on its own HTTP listener (prometheus_client's, in a thread)."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.registry = registry
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> None:
        self._server, self._thread = start_http_server(
            self.port, addr=self.host, registry=self.registry
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None


class _LiveWorkers(MultiProcessCollector):
    """Every worker's series, merged; first the gauges of workers that died without leaving
    (killed, then restarted by uvicorn under another pid) stop counting."""

    def collect(self) -> Iterable[Metric]:
        for path in Path(self._path).glob("gauge_live*_*.db"):
            pid = int(path.stem.rpartition("_")[2])
            if not _alive(pid):
                mark_process_dead(pid, self._path)  # type: ignore[no-untyped-call]
        merged: Iterable[Metric] = super().collect()  # type: ignore[no-untyped-call]
        return merged


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def workers_metrics(listen: str) -> Iterator[None]:
    """The parent of several workers: a fresh multiprocess directory for them (set in the
    environment, so set before they start), and every worker's series served on `listen`."""
    directory = tempfile.mkdtemp(prefix="apifast-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    registry = CollectorRegistry()
    _LiveWorkers(registry, directory)  # type: ignore[no-untyped-call]
    server = MetricsServer(registry, listen)
    try:
        server.start()
        yield
    finally:
        server.stop()
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)
