"""Publishes usage events to JetStream off the request path.

`submit()` only enqueues. A background task publishes with `Nats-Msg-Id` = generation id,
so a retried publish is deduplicated by the stream. Whatever cannot be published goes to
the local spool and is replayed when NATS is back; on shutdown the queue is drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import nats
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from apifast.jetstream import ensure_usage_stream
from router.spool import Spool, SpoolFull
from router.usage_event import UsageEvent

log = logging.getLogger("apifast.publisher")

_BATCH = 256
_PUBLISH_TIMEOUT_S = 2.0
_RETRY_S = 1.0


class EventPublisher:
    def __init__(
        self, nats_url: str, stream: str, subject: str, spool_dir: Path, spool_max: int
    ) -> None:
        self.nats_url = nats_url
        self.stream = stream
        self.subject = subject
        self.spool = Spool(spool_dir, spool_max)
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._closing = False
        self.published = 0

    @property
    def accepting(self) -> bool:
        """False when the spool is full: paid requests are then refused, not served unbilled."""
        return not self.spool.full

    @property
    def pending(self) -> int:
        return self._queue.qsize()

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
            except Exception as exc:  # noqa: BLE001 - any failure means "try again later"
                log.warning("NATS not reachable (%s); events spool locally", type(exc).__name__)
                await asyncio.sleep(_RETRY_S)

    def _connected(self) -> bool:
        return self._js is not None and self._nc is not None and self._nc.is_connected

    async def _publish_batch(self, batch: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Publish concurrently; returns the events that failed."""
        if not self._connected():
            return batch
        js = self._js
        assert js is not None

        async def one(item: tuple[str, bytes]) -> bool:
            try:
                await js.publish(
                    self.subject, item[1], headers={"Nats-Msg-Id": item[0]},
                    timeout=_PUBLISH_TIMEOUT_S,
                )  # fmt: skip
                return True
            except Exception:  # noqa: BLE001 - spooled and retried
                return False

        results = await asyncio.gather(*(one(item) for item in batch))
        self.published += sum(results)
        return [item for item, ok in zip(batch, results, strict=True) if not ok]

    def _spool(self, failed: list[tuple[str, bytes]]) -> None:
        try:
            self.spool.append([payload for _, payload in failed])
        except SpoolFull:
            # Unreachable in practice: requests are refused before the spool fills.
            log.error("usage spool full: %d events could not be kept", len(failed))

    async def _replay_spool(self) -> None:
        for path in self.spool.pending_files():
            lines = self.spool.read(path)
            items = [(_generation_id(line), line) for line in lines]
            for i in range(0, len(items), _BATCH):
                if await self._publish_batch(items[i : i + _BATCH]):
                    return  # NATS went away again; the file stays for the next try
            self.spool.remove(path, len(lines))

    async def _run(self) -> None:
        while True:
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=_RETRY_S)
            except TimeoutError:
                if self.spool.count and self._connected():
                    await self._replay_spool()
                continue
            batch = [first]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            failed = await self._publish_batch(batch)
            if failed:
                self._spool(failed)
            for _ in batch:
                self._queue.task_done()
            if self.spool.count and self._connected():
                await self._replay_spool()

    async def close(self) -> None:
        """Drain: every submitted event is published or spooled before this returns."""
        self._closing = True
        if self._connect_task:
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connect_task
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=10)
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        leftover = []
        while not self._queue.empty():
            leftover.append(self._queue.get_nowait())
        if leftover:
            self._spool(leftover)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()


def _generation_id(line: bytes) -> str:
    import orjson

    return str(orjson.loads(line)["generation_id"])
