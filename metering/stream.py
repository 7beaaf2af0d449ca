"""The usage stream's JetStream configuration, shared by the router and the meter, and how
their NATS clients connect (the server list, the error log)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

log = logging.getLogger("apifast.stream")

# Seconds that Nats-Msg-Id dedupe remembers an event. A publish whose ack was lost is
# spooled and replayed; the stream drops the copy if the replay comes within this window.
# A replay after a longer outage may store a second copy in the stream: the meter still
# counts it once (the ledger's unique generation id, ClickHouse's check), see docs/billing.md.
# The dedupe costs the server about 150 bytes per event in the window: 30 minutes at 1,000
# events/s is some 270 MB per replica (docs/scaling.md).
DUPLICATE_WINDOW_S = 30 * 60


class NatsErrorLog:
    """A NATS client's `error_cb` (`report`; nats-py takes only a coroutine function): one
    warning per kind of error a minute. nats-py's default logs an ERROR line (a whole
    traceback in text logs) for every reconnect attempt, two a second per client for as long
    as NATS is down, burying everything else. Named by the error's type only, like every
    ApiFast log line."""

    def __init__(self, client: str, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.client = client
        self.every_s = every_s
        self.clock = clock
        self.errors = 0  # every error seen, logged or not
        self._last: dict[str, float] = {}

    async def report(self, exc: Exception) -> None:
        self.errors += 1
        kind = type(exc).__name__
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.every_s:
            return
        self._last[kind] = now
        log.warning("nats (%s): %s; reconnecting (at most one such line a minute)",
                    self.client, kind)  # fmt: skip


def nats_servers(url: str) -> list[str]:
    """`APIFAST_NATS_URL` as a server list: one URL, or several comma-separated (a cluster,
    so a client fails over to the next server when one goes away)."""
    return [u.strip() for u in url.split(",") if u.strip()]


def usage_stream_config(stream: str, subject: str, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=stream,
        subjects=[subject],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=7 * 24 * 3600,  # seconds: time for a stopped meter to catch up
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


async def ensure_usage_stream(
    js: JetStreamContext, stream: str, subject: str, replicas: int = 1
) -> None:
    """Create the usage stream if missing; raise its replica count to `replicas` and its
    duplicate window to ours if lower (JetStream moves an R1 stream to R3 in place)."""
    config = usage_stream_config(stream, subject, replicas)
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        try:
            await js.add_stream(config)
        except BadRequestError:
            # Another process created it between our two calls.
            await js.stream_info(stream)
        return
    current = info.config
    if (current.num_replicas or 1) < replicas or (current.duplicate_window or 0) < (
        DUPLICATE_WINDOW_S
    ):
        log.warning("usage stream %s: raising replicas %s -> %d, duplicate window to %d s",
                    stream, current.num_replicas, replicas, DUPLICATE_WINDOW_S)  # fmt: skip
        current.num_replicas = max(replicas, current.num_replicas or 1)
        current.duplicate_window = max(DUPLICATE_WINDOW_S, current.duplicate_window or 0)
        await js.update_stream(current)
