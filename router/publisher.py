"""Publishes usage events to JetStream off the request path.

`submit()` only enqueues. A background task publishes with `Nats-Msg-Id` = generation id,
so a retried publish is deduplicated by the stream. Whatever cannot be published goes to
the local spool (fsynced) and is replayed when NATS is back, by this process or, after a
crash, by any later router sharing the data dir. On shutdown every submitted event is
either acknowledged by the stream or on disk in the spool: nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from pathlib import Path

import asyncpg
import nats
import orjson
from nats.aio.client import NO_RESPONDERS_STATUS
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import Header
from nats.js.client import JetStreamContext

from apifast.db import Queries
from apifast.metering.event import UsageEvent, message_id
from apifast.metering.stream import NatsErrorLog, ensure_usage_stream, nats_servers
from apifast.metrics import Metrics
from apifast.router.spool import Spool

log = logging.getLogger("apifast.publisher")

_BATCH = 256
_PUBLISH_TIMEOUT_S = 2.0
_LINGER_S = 0.005  # the longest an event waits for others to share its publish
_RETRY_S = 1.0
_DRAIN_TIMEOUT_S = 10.0
_RESCAN_OFFLINE_S = 5.0

Item = tuple[str, bytes]  # (generation id, event JSON)
_Q = Queries("apifast.router")


class EventPublisher:
    def __init__(
        self,
        nats_url: str,
        stream: str,
        subject: str,
        spool_dir: Path,
        spool_max: int,
        replicas: int = 1,
    ) -> None:
        self.nats_url = nats_url
        self.replicas = replicas
        self.stream = stream
        self.subject = subject
        self.spool = Spool(spool_dir, spool_max)
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self.nats_errors = NatsErrorLog("apifast-router")
        self._task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._inflight: list[Item] = []  # taken off the queue, not yet published or spooled
        self._unspooled: list[Item] = []  # the spool's disk refused them; retried every tick
        self._stream_missing = False
        self._closing = False
        self._acks: dict[str, asyncio.Future[bool]] = {}  # reply subject -> stored?
        self._ack_prefix: str | None = None
        self._ack_client: NATS | None = None
        self._ack_seq = 0
        self._pool: asyncpg.Pool | None = None
        self._hold_ttl_s = 0
        self._next_hold_refresh = 0.0
        self._next_rescan = 0.0
        self.published = 0
        self.metrics: Metrics | None = None  # set by the composition root

    def keep_holds_alive(self, pool: asyncpg.Pool, ttl_s: int) -> None:
        """While events wait in the spool, keep their requests' holds from expiring: they
        will be settled once the events are published (see docs/billing.md)."""
        self._pool, self._hold_ttl_s = pool, ttl_s

    @property
    def accepting(self) -> bool:
        """False when the spool is full: paid requests are then refused, not served unbilled."""
        if self._unspooled:
            return False
        return self.spool.count + self._queue.qsize() < self.spool.max_events

    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._inflight)

    def submit(self, event: UsageEvent) -> None:
        self._queue.put_nowait(
            (message_id(event.generation_id, event.checkpoint), event.to_bytes())
        )

    async def start(self) -> None:
        self.spool.open()
        self._connect_task = asyncio.create_task(self._connect_forever())
        self._task = asyncio.create_task(self._run())

    async def _connect_forever(self) -> None:
        while not self._closing:
            try:
                nc = await nats.connect(
                    nats_servers(self.nats_url),
                    name="apifast-router",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    allow_reconnect=True,
                    disconnected_cb=self._on_disconnect,
                    error_cb=self.nats_errors.report,
                )
                js = nc.jetstream(timeout=_PUBLISH_TIMEOUT_S)
                await ensure_usage_stream(js, self.stream, self.subject, self.replicas)
                self._nc, self._js = nc, js
                return
            except Exception as exc:  # any failure means "try again later"
                log.warning("NATS not reachable (%s); events spool locally", type(exc).__name__)
                await asyncio.sleep(_RETRY_S)

    async def _on_disconnect(self) -> None:
        # The acks of what was sent may never come: fail them now, so their events are
        # spooled at once rather than after the ack timeout. An event that did reach the
        # stream is dropped as a duplicate (Nats-Msg-Id) when the spool is replayed.
        pending, self._acks = self._acks, {}
        for ack in pending.values():
            if not ack.done():
                ack.set_result(False)

    def connected(self) -> bool:
        return self._js is not None and self._nc is not None and self._nc.is_connected

    async def _publish_batch(self, batch: list[Item]) -> list[Item]:
        """Publish concurrently; returns the events that failed."""
        if not self.connected():
            return batch
        js = self._js
        assert js is not None
        if self._stream_missing:
            # A NATS server that came back without its store: recreate the stream first.
            try:
                await ensure_usage_stream(js, self.stream, self.subject, self.replicas)
                self._stream_missing = False
            except Exception:  # still down; spooled and retried
                return batch

        nc = self._nc
        assert nc is not None
        # Send the whole batch, then wait for its acks together: one timeout per batch, and
        # acks matched by reply subject (nats-py's publish() costs a task and a timer each).
        try:
            prefix = await self._ack_inbox(nc)
        except Exception:  # not connected after all: spooled and retried
            return batch
        loop = asyncio.get_running_loop()
        acks: list[asyncio.Future[bool] | None] = []
        for generation_id, payload in batch:
            self._ack_seq += 1
            reply = prefix + str(self._ack_seq)
            ack: asyncio.Future[bool] = loop.create_future()
            self._acks[reply] = ack
            try:
                await nc.publish(
                    self.subject, payload, reply=reply, headers={"Nats-Msg-Id": generation_id}
                )
                acks.append(ack)
            except Exception:  # not sent: spooled and retried
                del self._acks[reply]
                acks.append(None)
        sent = [ack for ack in acks if ack is not None]
        if sent:
            _, late = await asyncio.wait(sent, timeout=_PUBLISH_TIMEOUT_S)
            for unanswered in late:
                unanswered.cancel()
            if late:
                # Forget the unanswered; a late ack finds nothing and is ignored.
                self._acks = {k: v for k, v in self._acks.items() if not v.done()}
        failed = [
            item
            for item, ack in zip(batch, acks, strict=True)
            if ack is None or ack.cancelled() or not ack.result()
        ]
        self.published += len(batch) - len(failed)
        return failed

    async def _ack_inbox(self, nc: NATS) -> str:
        """The reply-subject prefix of our acks, subscribed once per connection."""
        if self._ack_prefix is None or self._ack_client is not nc:
            prefix = nc.new_inbox() + "."
            await nc.subscribe(prefix + "*", cb=self._on_ack)
            self._ack_prefix, self._ack_client = prefix, nc
        return self._ack_prefix

    async def _on_ack(self, msg: Msg) -> None:
        ack = self._acks.pop(msg.subject, None)
        if ack is None or ack.done():
            return
        if msg.headers and msg.headers.get(Header.STATUS) == NO_RESPONDERS_STATUS:
            self._stream_missing = True  # no stream listens: recreate it before retrying
            ack.set_result(False)
            return
        try:
            reply = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            reply = None
        # A stored event, or a duplicate of one (dedupe by Nats-Msg-Id); anything else failed.
        ack.set_result(isinstance(reply, dict) and "seq" in reply and "error" not in reply)

    def spool_age_s(self) -> float:
        """Age of the oldest spooled event (when its segment was started), 0 when none."""
        try:
            created = self.spool.oldest_created()
        except OSError:
            return 0.0
        return 0.0 if created is None else max(0.0, time.time() - created)

    def _spool(self, items: list[Item]) -> None:
        if items and self.metrics is not None:
            self.metrics.publish_failures.inc(len(items))
        items = self._unspooled + items
        self._unspooled = []
        if not items:
            return
        try:
            self.spool.append([payload for _, payload in items])
        except OSError as exc:
            # Disk full or gone: keep them in memory, refuse new paid requests, retry.
            log.error("usage spool write failed (%s); %d events held in memory",
                      type(exc).__name__, len(items))  # fmt: skip
            self._unspooled = items

    async def _replay_spool(self) -> None:
        """Publish every spool segment this process can claim; stop at the first failure."""
        for segment in self.spool.claim():
            try:
                lines = segment.lines()
                items = [item for item in map(_item, lines) if item is not None]
                for i in range(0, len(items), _BATCH):
                    if await self._publish_batch(items[i : i + _BATCH]):
                        return  # NATS went away again; the segment stays for the next try
                segment.delete()
                self.spool.replayed(len(lines))
                log.info("replayed %d spooled usage events", len(items))
            finally:
                segment.release()

    async def _refresh_holds(self) -> None:
        """Extend the holds of every spooled event (this router's and any other's in the
        directory), every quarter of the TTL."""
        now = time.monotonic()
        if self._pool is None or not self.spool.count or now < self._next_hold_refresh:
            return
        self._next_hold_refresh = now + max(0.5, self._hold_ttl_s / 4)
        items = [item for item in map(_item, self.spool.all_lines()) if item is not None]
        items += self._unspooled
        ids = [gid for gid, _ in items]
        # An event served from a balance lease is held by the lease's row: keep that alive.
        ids += sorted({lease for _, line in items if (lease := _lease_of(line))})
        try:
            for i in range(0, len(ids), 5000):
                await self._pool.execute(
                    _Q.extend_reservations, ids[i : i + 5000], self._hold_ttl_s
                )
        except Exception as exc:  # Postgres down too: the holds last their TTL
            log.warning("could not extend the holds of spooled events: %s", type(exc).__name__)

    async def _tick(self) -> None:
        """Idle housekeeping: retry held events, keep their holds, adopt spools of crashed
        routers, replay."""
        if self._unspooled:
            self._spool([])
        await self._refresh_holds()
        now = time.monotonic()
        if not self.connected():
            # Other routers may be filling the shared spool too: recount now and then.
            if now >= self._next_rescan:
                self._next_rescan = now + _RESCAN_OFFLINE_S
                self.spool.rescan()
            return
        self.spool.rescan()
        if self.spool.count:
            await self._replay_spool()

    async def _run(self) -> None:
        next_tick = 0.0
        while True:
            try:
                first: Item | None = await asyncio.wait_for(self._queue.get(), timeout=_RETRY_S)
            except TimeoutError:
                first = None
            if first is not None:
                await self._publish_queued(first)
            # Housekeeping about once a second, busy or idle.
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + _RETRY_S
                await self._guarded(self._tick())

    async def _publish_queued(self, first: Item) -> None:
        batch = [first]
        # If this task is cancelled mid-publish, close() spools `_inflight`.
        self._inflight = batch
        while len(batch) < _BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if len(batch) < _BATCH and not self._closing:
            # Linger a moment for more: at a low request rate each event would otherwise be
            # a publish and an ack of its own, run between one request and the next.
            await asyncio.sleep(_LINGER_S)
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
        try:
            failed = await self._publish_batch(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never lose a batch to a bug
            log.error("publishing failed unexpectedly: %s", type(exc).__name__)
            failed = batch
        self._spool(failed)
        self._inflight = []
        for _ in batch:
            self._queue.task_done()

    async def _guarded(self, step: Awaitable[None]) -> None:
        try:
            await step
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the spool stays for the next tick
            log.error("spool replay failed: %s", type(exc).__name__)

    async def close(self) -> None:
        """Drain: every submitted event is published or spooled before this returns."""
        self._closing = True
        if self._connect_task:
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connect_task
        if self._task and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout=_DRAIN_TIMEOUT_S)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        leftover = list(self._inflight)
        self._inflight = []
        while not self._queue.empty():
            leftover.append(self._queue.get_nowait())
        self._spool(leftover)  # duplicates of published ones are dropped by the stream
        if self._unspooled:
            log.critical("usage spool unwritable at shutdown: %d events lost",
                         len(self._unspooled))  # fmt: skip
        self.spool.close()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()


def _lease_of(line: bytes) -> str:
    try:
        return str(orjson.loads(line).get("lease") or "")
    except (ValueError, AttributeError):
        return ""


def _item(line: bytes) -> Item | None:
    try:
        event = orjson.loads(line)
        return message_id(str(event["generation_id"]), int(event.get("checkpoint") or 0)), line
    except (ValueError, KeyError, TypeError):
        log.error("skipping an unreadable spool line")
        return None
