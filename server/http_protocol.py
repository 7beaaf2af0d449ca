"""uvicorn's httptools protocol, with a response's head and body sent in one write.

uvicorn writes the status line and headers the moment the app sends `http.response.start`,
and the body in a second write. Over TCP that is two segments: the client wakes for the
head, then again for the body, and the server pays two send calls. With the body in the
same event-loop step (every non-streaming answer, and a stream's head with its first
piece), this protocol joins them: a write is held until the next one or, at the latest,
the end of the current loop step, so nothing waits longer than it takes the app to yield.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_COPY_BELOW = 64 * 1024


class CoalescingTransport:
    """Forwards to the connection's transport; a write is held until the next write (sent
    together, at once) or the end of the loop step, whichever comes first."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._held = None
        if len(data) < _COPY_BELOW:
            self._transport.write(held + data)
        else:  # a large body is not copied to join it
            self._transport.writelines((held, data))

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Flow control (pausing reads and writes) keeps the real transport; the request
        # cycles, which write the responses, get the coalescing one.
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
