"""The server's HTTP protocol sends a response's head and body in one write
(server/http_protocol.py): held writes, the end-of-step flush, close, and a real server
answering through it, streaming and not."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

from apifast.server.http_protocol import CoalescingHttpToolsProtocol, CoalescingTransport
from tests.harness import free_port


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, pieces: Any) -> None:
        self.writes.append(b"".join(pieces))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def test_a_head_and_its_body_go_out_in_one_write() -> None:
    real = RecordingTransport()
    t = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert real.writes == []  # held for what follows
    t.write(b"body")
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    large = b"x" * (1 << 20)
    t.write(b"head")
    t.write(large)
    assert real.writes[-1] == b"head" + large
    await asyncio.sleep(0)  # the scheduled flushes find nothing left
    assert len(real.writes) == 2


async def test_a_lone_write_is_sent_at_the_end_of_the_loop_step() -> None:
    real = RecordingTransport()
    t = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"data: 1\n\n")
    await asyncio.sleep(0)
    assert real.writes == [b"data: 1\n\n"]


async def test_close_sends_what_is_held_first_and_nothing_goes_to_a_closed_transport() -> None:
    real = RecordingTransport()
    t = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"last")
    t.close()
    assert real.writes == [b"last"] and real.closed and t.is_closing()
    t.write(b"late")
    await asyncio.sleep(0)
    assert real.writes == [b"last"]
    assert t.get_extra_info("peername") == "info:peername"  # the rest is the transport's


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        for n in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % n,
                        "more_body": True})  # fmt: skip
            await asyncio.sleep(0.01)  # each piece in a loop step of its own
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"ok": true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def test_a_real_server_answers_through_it_with_keep_alive() -> None:
    port = free_port()
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="off", loop="none", http=CoalescingHttpToolsProtocol)  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped during start-up")
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # the same connection, twice
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"content-length: 12" in head
            assert await reader.readexactly(12) == b'{"ok": true}'
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            chunk = await reader.readexactly(size + 2)
            if not size:
                break
            chunks.append(chunk[:-2])
        assert chunks == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
        writer.close()
    finally:
        server.should_exit = True
        await task
