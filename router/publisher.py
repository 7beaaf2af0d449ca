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
from collections.abc import Awaitable
from pathlib import Path

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.js.client import JetStreamContext

from apifast.jetstream import ensure_usage_stream
from router.spool import Spool
from router.usage_event import UsageEvent

log = logging.getLogger("apifast.publisher")

_BATCH = 256
_PUBLISH_TIMEOUT_S = 2.0
_RETRY_S = 1.0
_DRAIN_TIMEOUT_S = 10.0

Item = tuple[str, bytes]  # (generation id, event JSON)


class EventPublisher:
    def __init__(
        self, nats_url: str, stream: str, subject: str, spool_dir: Path, spool_max: int
    ) -> None:
        self.nats_url = nats_url
        self.stream = stream
        self.subject = subject
        self.spool = Spool(spool_dir, spool_max)
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._inflight: list[Item] = []  # taken off the queue, not yet published or spooled
        self._unspooled: list[Item] = []  # the spool's disk refused them; retried every tick
        self._stream_missing = False
        self._closing = False
        self.published = 0

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
        self._queue.put_nowait((event.generation_id, event.to_bytes()))

    async def start(self) -> None:
        self.spool.open()
        self._connect_task = asyncio.create_task(self._connect_forever())
        self._task = asyncio.create_task(self._run())

    async def _connect_forever(self) -> None:
        while not self._closing:
            try:
                nc = await nats.connect(
                    self.nats_url,
                    name="apifast-router",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    allow_reconnect=True,
                )
                js = nc.jetstream(timeout=_PUBLISH_TIMEOUT_S)
                await ensure_usage_stream(js, self.stream, self.subject)
                self._nc, self._js = nc, js
                return
            except Exception as exc:  # any failure means "try again later"
                log.warning("NATS not reachable (%s); events spool locally", type(exc).__name__)
                await asyncio.sleep(_RETRY_S)

    def connected(self) -> bool:
        return self._js is not None and self._nc is not None and self._nc.is_connected

    _connected = connected  # the name /healthz uses

    async def _publish_batch(self, batch: list[Item]) -> list[Item]:
        """Publish concurrently; returns the events that failed."""
        if not self.connected():
            return batch
        js = self._js
        assert js is not None
        if self._stream_missing:
            # A NATS server that came back without its store: recreate the stream first.
            try:
                await ensure_usage_stream(js, self.stream, self.subject)
                self._stream_missing = False
            except Exception:  # still down; spooled and retried
                return batch

        async def one(item: Item) -> bool:
            try:
                await js.publish(
                    self.subject, item[1], headers={"Nats-Msg-Id": item[0]},
                    timeout=_PUBLISH_TIMEOUT_S,
                )  # fmt: skip
                return True
            except NoRespondersError:
                self._stream_missing = True
                return False
            except Exception:  # spooled and retried
                return False

        results = await asyncio.gather(*(one(item) for item in batch))
        self.published += sum(results)
        return [item for item, ok in zip(batch, results, strict=True) if not ok]

    def _spool(self, items: list[Item]) -> None:
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

    async def _tick(self) -> None:
        """Idle housekeeping: retry held events, adopt spools of crashed routers, replay."""
        if self._unspooled:
            self._spool([])
        if not self.connected():
            return
        self.spool.rescan()
        if self.spool.count:
            await self._replay_spool()

    async def _run(self) -> None:
        while True:
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=_RETRY_S)
            except TimeoutError:
                await self._guarded(self._tick())
                continue
            batch = [first]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # If this task is cancelled mid-publish, close() spools `_inflight`.
            self._inflight = batch
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
            if self.spool.count and self.connected():
                await self._guarded(self._replay_spool())

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


def _item(line: bytes) -> Item | None:
    try:
        return str(orjson.loads(line)["generation_id"]), line
    except (ValueError, KeyError, TypeError):
        log.error("skipping an unreadable spool line")
        return None
