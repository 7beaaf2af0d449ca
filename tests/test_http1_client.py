"""plugins/providers/http1.py against real HTTP servers on 127.0.0.1: aiohttp for ordinary
answers, raw asyncio servers for the wire-level edge cases."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from apifast.plugins.providers.http1 import Http1Client, HttpError, HttpTimeout, encode_headers
from apifast.plugins.providers.sse import sse_data

HEADERS = encode_headers({"Content-Type": "application/json", "Accept": "application/json"})


class Upstream:
    """An aiohttp server that records which TCP connection carried each request."""

    def __init__(self) -> None:
        self.peers: list[object] = []
        self.bodies: list[bytes] = []
        self.app = web.Application()
        self.runner: web.AppRunner | None = None
        self.url = ""

    def route(
        self, path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> None:
        async def recorded(request: web.Request) -> web.StreamResponse:
            assert request.transport is not None
            self.peers.append(request.transport.get_extra_info("peername"))
            self.bodies.append(await request.read())
            return await handler(request)

        self.app.router.add_route("*", path, recorded)

    async def start(self) -> Upstream:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    yield server
    await server.stop()


async def raw_server(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> tuple[asyncio.AbstractServer, str]:  # fmt: skip
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


async def test_keeps_connections_alive_and_sends_the_request(upstream: Upstream) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "host": request.host})

    upstream.route("/v1/chat/completions", ok)
    await upstream.start()
    client = Http1Client(upstream.url)
    try:
        for i in range(3):
            status, data = await client.fetch(
                b"POST", "/chat/completions", b'{"n":%d}' % i, HEADERS
            )
            assert status == 200
            assert b'"path": "/v1/chat/completions"' in data
    finally:
        await client.close()
    assert upstream.bodies == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    assert len(set(upstream.peers)) == 1, "a new connection was opened per request"


async def test_chunked_gzip_and_error_statuses(upstream: Upstream) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"one ", b"two ", b"three"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def zipped(request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(b"x" * 10_000), headers={"Content-Encoding": "gzip"})

    async def failing(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    upstream.route("/v1/chunked", chunked)
    upstream.route("/v1/zipped", zipped)
    upstream.route("/v1/failing", failing)
    await upstream.start()
    client = Http1Client(upstream.url)
    try:
        assert await client.fetch(b"POST", "/chunked", b"{}", HEADERS) == (200, b"one two three")
        assert await client.fetch(b"POST", "/zipped", b"{}", HEADERS) == (200, b"x" * 10_000)
        assert await client.fetch(b"POST", "/failing", b"{}", HEADERS) == (503, b"busy")
        # The connection survived all three.
        assert (await client.fetch(b"GET", "/chunked", b"", HEADERS))[0] == 200
    finally:
        await client.close()
    assert len(set(upstream.peers)) == 1


async def test_streams_incrementally_with_flow_control(upstream: Upstream) -> None:
    piece = b"data: " + b"y" * 1000 + b"\n\n"
    count = 2000  # ~2 MB: well past the high-water mark, read slowly

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(count):
            await resp.write(piece)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    upstream.route("/v1/stream", stream)
    await upstream.start()
    client = Http1Client(upstream.url)
    try:
        response = await client.request(b"POST", "/stream", b"{}", HEADERS, stream=True)
        assert response.status == 200
        events = []
        async for data in sse_data(response.chunks()):
            events.append(data)
            if len(events) % 200 == 0:
                await asyncio.sleep(0.01)  # a slow client
        assert len(events) == count + 1 and events[-1] == b"[DONE]"
        assert all(e == b"y" * 1000 for e in events[:-1])
        # Fully read: the connection is reused.
        assert (await client.fetch(b"POST", "/stream", b"{}", HEADERS))[0] == 200
    finally:
        await client.close()
    assert len(set(upstream.peers)) == 1


async def test_a_stream_abandoned_midway_closes_its_connection(upstream: Upstream) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(100):
            await resp.write(b"data: {}\n\n")
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    upstream.route("/v1/endless", endless)
    await upstream.start()
    client = Http1Client(upstream.url)
    try:
        response = await client.request(b"POST", "/endless", b"{}", HEADERS, stream=True)
        async for _ in response.chunks():
            break
        response.close()
        assert (await client.fetch(b"POST", "/endless", b"{}", HEADERS))[0] == 200
    finally:
        await client.close()
    assert len(set(upstream.peers)) == 2


async def test_connection_limit_queues_requests(upstream: Upstream) -> None:
    async def slowish(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.Response(text="ok")

    upstream.route("/v1/slow", slowish)
    await upstream.start()
    client = Http1Client(upstream.url, limit=2)
    try:
        results = await asyncio.gather(
            *(client.fetch(b"POST", "/slow", b"{}", HEADERS) for _ in range(6))
        )
    finally:
        await client.close()
    assert results == [(200, b"ok")] * 6
    assert len(set(upstream.peers)) == 2


async def test_read_timeout_and_refused_connections() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)
        writer.close()

    server, url = await raw_server(silent)
    client = Http1Client(url, read_timeout=0.2)
    try:
        with pytest.raises(HttpTimeout):
            await client.fetch(b"POST", "/chat/completions", b"{}", HEADERS)
    finally:
        await client.close()
        server.close()
    refused = Http1Client(url, connect_timeout=2)
    with pytest.raises(HttpError):
        await refused.fetch(b"POST", "/chat/completions", b"{}", HEADERS)


async def test_wire_edge_cases() -> None:
    """A body delimited by the connection's end, an interim 103, a broken chunked body and
    an idle connection closed by the server."""
    answers = [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-the-end",
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nbroke",
    ]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()  # every answer ends its connection

    server, url = await raw_server(handle)
    client = Http1Client(url)
    try:
        assert await client.fetch(b"POST", "/a", b"{}", HEADERS) == (200, b"until-the-end")
        assert await client.fetch(b"POST", "/b", b"{}", HEADERS) == (200, b"final")
        with pytest.raises(HttpError):
            await client.fetch(b"POST", "/c", b"{}", HEADERS)
    finally:
        await client.close()
        server.close()


async def test_sse_data_across_reads() -> None:
    async def reads() -> AsyncIterator[bytes]:
        for part in (b"data: {\"a\"", b":1}\r\n\r\nevent: x\ndata: li", b"ne1\ndata: line2\n\n",
                     b": comment\n\ndata:  [DONE]"):  # fmt: skip
            yield part

    assert [e async for e in sse_data(reads())] == [b'{"a":1}', b"line1\nline2", b"[DONE]"]


def test_header_values_cannot_smuggle_lines() -> None:
    with pytest.raises(ValueError):
        encode_headers({"Authorization": "Bearer x\r\nX-Evil: 1"})
