"""The one Server-Sent Events parser the HTTP provider plugins share.

`SseDecoder` is fed whole network reads (not lines), which is what keeps it cheap on the
streaming hot path: one `split` per read, not one call per line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator


class SseDecoder:
    """Incremental parser: `feed(bytes)` returns the events it completed, as (event name,
    data) pairs; `data` lines are joined with newlines. `close()` returns what was left."""

    __slots__ = ("_data", "_event", "_rest")

    def __init__(self) -> None:
        self._rest = b""
        self._event = ""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        lines = (self._rest + chunk if self._rest else chunk).split(b"\n")
        self._rest = lines.pop()
        events: list[tuple[str, bytes]] = []
        for raw in lines:
            self._line(raw.rstrip(b"\r"), events)
        return events

    def close(self) -> list[tuple[str, bytes]]:
        """End of body: a final event without its blank line still counts."""
        events: list[tuple[str, bytes]] = []
        if self._rest:
            self._line(self._rest.rstrip(b"\r"), events)
            self._rest = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[tuple[str, bytes]]) -> None:
        if not line:
            if self._data:
                events.append((self._event, b"\n".join(self._data)))
            self._event, self._data = "", []
        elif line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value.lstrip(b" "))
        elif line.startswith(b"event:"):
            self._event = line[6:].strip().decode("utf-8", "replace")
        # Comments (":") and other fields (id:, retry:) carry nothing we use.


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The `data` of each event in a streamed body (event names are dropped)."""
    decoder = SseDecoder()
    async for chunk in chunks:
        for _, data in decoder.feed(chunk):
            yield data
    for _, data in decoder.close():
        yield data
