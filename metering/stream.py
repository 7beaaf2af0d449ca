"""The usage stream's JetStream configuration, shared by the router and the meter."""

from __future__ import annotations

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError


def usage_stream_config(stream: str, subject: str) -> StreamConfig:
    return StreamConfig(
        name=stream,
        subjects=[subject],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=7 * 24 * 3600,  # seconds: time for a stopped meter to catch up
        duplicate_window=600,  # seconds: Nats-Msg-Id dedupe covers spool replays
    )


async def ensure_usage_stream(js: JetStreamContext, stream: str, subject: str) -> None:
    config = usage_stream_config(stream, subject)
    try:
        await js.stream_info(stream)
    except NotFoundError:
        try:
            await js.add_stream(config)
        except BadRequestError:
            # Another process created it between our two calls.
            await js.stream_info(stream)
