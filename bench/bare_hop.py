"""The thinnest Python proxy hop, the bench's yardstick for ApiFast: raw ASGI on uvicorn
(httptools, uvloop), an aiohttp client with kept-alive connections, bodies passed through
as bytes. It forwards every request to the same path on the upstream and relays the answer,
streamed chunk by chunk when it is a stream. No auth, no billing, no parsing: whatever
ApiFast adds over this is the cost of being a gateway.

    python bench/bare_hop.py PORT UPSTREAM_ORIGIN    # e.g. 8100 http://127.0.0.1:8080
"""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import aiohttp
import uvicorn

Scope = dict[str, Any]


class BareHop:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        assert self.session is not None
        async with self.session.post(
            self.upstream + scope["path"], data=body,
            headers={"Content-Type": "application/json"},
        ) as upstream:  # fmt: skip
            content_type = upstream.headers.get("Content-Type", "application/json")
            if content_type.startswith("text/event-stream"):
                await send({"type": "http.response.start", "status": upstream.status,
                            "headers": [(b"content-type", content_type.encode())]})  # fmt: skip
                async for chunk in upstream.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            data = await upstream.read()
            await send({"type": "http.response.start", "status": upstream.status, "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(data)).encode()),
            ]})  # fmt: skip
            await send({"type": "http.response.body", "body": data})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


class HopProcess:
    """The hop as the bench's own child process, on a free port; stopped by its PID."""

    def __init__(self, upstream_origin: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.upstream_origin = upstream_origin
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HopProcess:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.port), self.upstream_origin],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        from bench.children import wait_listening  # the bench's; not where the hop runs

        wait_listening(self.proc, self.port, "the bare hop", 15)
        return self

    def cpu_seconds(self) -> float:
        from bench.children import cpu_seconds

        return cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        from bench.children import stop_child

        stop_child(self.proc)
        self.proc = None


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(
        BareHop(upstream), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
        log_level="warning", access_log=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
