"""Route health shared between routers over core NATS, so that one router's discovery (a
breaker opening, a probe closing it, a Retry-After bench) spares the others the same
failures.

Each breaker change is published on APIFAST_ROUTE_HEALTH_SUBJECT as a small JSON message:
the router's id, the model id, the route's index and fingerprint, what happened and for how
long. Receivers apply it to their own `RouteBook` (ignoring their own messages, and reports
about a route their catalog does not have at that index). Nothing is persisted: it is
advisory, and without NATS each router keeps its own state, as it always does.

Changes alone would leave a router that starts (or reconnects) late unaware of breakers
already open, so on every connect it asks its peers on `<subject>.snapshot`, with a reply
inbox of its own: each peer that has open or benched routes answers with them, their
remaining seconds included, and the answers are applied like ordinary reports. Nobody
waits for them (a lone router gets no answer, which is harmless): requests go on with local
state, and answers are applied whenever they arrive. A router that reconnects also
re-announces its own open and benched routes as ordinary reports: after a NATS outage the
routers come back in any order, and whichever returns last either asks a peer already
subscribed or announces to one (the server handles each connection's messages in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NATS

from apifast.catalog.toml import Model
from apifast.metering.stream import NatsErrorLog, nats_servers
from apifast.router.route_book import RouteBook, fingerprint
from apifast.router.route_choice import RouteEntry

log = logging.getLogger("apifast.router")
_RETRY_S = 2.0


class HealthShare:
    def __init__(
        self,
        book: RouteBook,
        nats_url: str,
        subject: str,
        models: Callable[[str], Model | None],
    ) -> None:
        self.book = book
        self.nats_url = nats_url
        self.subject = subject
        self.models = models
        self.router_id = os.urandom(8).hex()
        self.nats_errors = NatsErrorLog("apifast-route-health")
        self.applied = 0  # reports from other routers applied (for tests and logs)
        self.snapshot_subject = f"{subject}.snapshot"
        self._inbox = ""  # where this router's snapshot requests are answered
        self._nc: NATS | None = None
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self.book.on_change = self.report
        self._task = asyncio.create_task(self._connect_forever(), name="apifast-route-health")

    async def wait_ready(self) -> None:
        """Until connected and subscribed (tests; requests never wait for it)."""
        await self._ready.wait()

    async def close(self) -> None:
        if self.book.on_change == self.report:
            self.book.on_change = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def _connect_forever(self) -> None:
        while True:
            try:
                nc = await nats.connect(
                    # Every node of a cluster (APIFAST_NATS_URL, comma-separated): nats-py
                    # refuses the comma-joined string as one URL.
                    nats_servers(self.nats_url), name="apifast-route-health",
                    max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2,
                    allow_reconnect=True,
                    reconnected_cb=self._reconnected,
                    error_cb=self.nats_errors.report,
                )  # fmt: skip
                self._nc = nc
                await nc.subscribe(self.subject, cb=self._received)
                await nc.subscribe(self.snapshot_subject, cb=self._answer_snapshot)
                self._inbox = nc.new_inbox()
                await nc.subscribe(self._inbox, cb=self._snapshot_received)
                await self._ask_snapshot(nc)
                await nc.flush()
                self._ready.set()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("route health: NATS not reachable (%s); local only", type(exc).__name__)
                if self._nc is not None:  # connected, then failed to subscribe: start over
                    with contextlib.suppress(Exception):
                        await self._nc.close()
                    self._nc = None
                await asyncio.sleep(_RETRY_S)

    async def _reconnected(self) -> None:
        # What changed while this router was cut off was not heard, and what it learnt was
        # not told: ask again, and tell.
        nc = self._nc
        if nc is None:
            return
        await self._ask_snapshot(nc)
        for model_id, entry, what, seconds in self.book.open_reports():
            await self._send(nc, self._payload(model_id, entry, what, seconds))

    async def _ask_snapshot(self, nc: NATS) -> None:
        """Ask the peers for their open and benched routes (answered on `_inbox`)."""
        try:
            await nc.publish(self.snapshot_subject, orjson.dumps({"r": self.router_id}),
                             reply=self._inbox)  # fmt: skip
        except Exception as exc:
            log.warning("route health: snapshot request failed (%s)", type(exc).__name__)

    async def _answer_snapshot(self, msg: Any) -> None:
        """A peer asks what this router knows: answer with its open and benched routes (no
        answer when there are none, or when the asker is this router itself)."""
        try:
            ask = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if not msg.reply or not isinstance(ask, dict) or ask.get("r") == self.router_id:
            return
        reports = [
            {"model": model_id, "i": entry.index, "fp": fingerprint(entry.route), "what": what,
             "s": seconds}
            for model_id, entry, what, seconds in self.book.open_reports()
        ]  # fmt: skip
        if not reports:
            return
        nc = self._nc
        if nc is None or not nc.is_connected:
            return
        payload = orjson.dumps({"r": self.router_id, "reports": reports})
        try:
            await nc.publish(msg.reply, payload)
        except Exception as exc:
            log.warning("route health: snapshot answer failed (%s)", type(exc).__name__)

    async def _snapshot_received(self, msg: Any) -> None:
        try:
            answer = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("reports"), list):
            log.warning("route health: ignored a malformed snapshot")
            return
        sender = answer.get("r")
        for report in answer["reports"]:
            if isinstance(report, dict):
                self._apply({**report, "r": sender})

    def report(self, model_id: str, entry: RouteEntry, what: str, seconds: float) -> None:
        """RouteBook's change hook: publish without waiting (best effort)."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return
        payload = self._payload(model_id, entry, what, seconds)
        task = asyncio.get_running_loop().create_task(self._send(nc, payload))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _payload(self, model_id: str, entry: RouteEntry, what: str, seconds: float) -> bytes:
        return orjson.dumps({
            "r": self.router_id, "model": model_id, "i": entry.index,
            "fp": fingerprint(entry.route), "what": what, "s": seconds,
        })  # fmt: skip

    async def _send(self, nc: NATS, payload: bytes) -> None:
        try:
            await nc.publish(self.subject, payload)
        except Exception as exc:
            log.warning("route health: publish failed (%s)", type(exc).__name__)

    async def _received(self, msg: Any) -> None:
        try:
            report = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            report = None
        if not isinstance(report, dict):
            log.warning("route health: ignored a malformed report")
            return
        self._apply(report)

    def _apply(self, report: dict[str, Any]) -> None:
        """One report (a change, or one line of a snapshot) applied to the book, unless it
        is this router's own or about a route this router's catalog does not have."""
        try:
            if report.get("r") == self.router_id:
                return
            model = self.models(str(report["model"]))
            if model is None:
                return
            seconds = float(report["s"])
            if self.book.apply(model, int(report["i"]), str(report["fp"]), str(report["what"]),
                               seconds):  # fmt: skip
                self.applied += 1
        except (KeyError, TypeError, ValueError):
            log.warning("route health: ignored a malformed report")
