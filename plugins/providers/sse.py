"""A minimal Server-Sent Events line reader shared by the HTTP provider plugins."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, bytes]]:
    """Yield (event name, data) for each event; `data` lines are joined with newlines."""
    event = ""
    data: list[bytes] = []
    async for raw in content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield event, b"\n".join(data)
            event, data = "", []
            continue
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode("utf-8", "replace")
        # Comments (":") and other fields (id:, retry:) carry nothing we use.
    if data:
        yield event, b"\n".join(data)
