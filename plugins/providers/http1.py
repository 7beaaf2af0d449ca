"""A lean HTTP/1.1 client for provider plugins: keep-alive connections to one upstream, on
asyncio protocols and the httptools (llhttp) parser.

aiohttp spends about ten times the CPU per call (bench/client_bench.py), which made it the
largest cost of a proxied request. This client does only what LLM APIs need: a request
with a body; JSON or SSE answers framed by Content-Length, chunked encoding or the end of
the connection; gzip/deflate; TLS; connect and read timeouts; a connection limit.
No redirects, cookies, proxies or retries: a POST to a model is not idempotent.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httptools

# Unread body above this pauses reading from the upstream until the consumer catches up.
_HIGH_WATER = 256 * 1024


class HttpError(Exception):
    """No usable answer: connecting failed, or the connection broke or spoke nonsense.
    The message names the failure only; it never holds request or response content.
    `cause` classes it: refused | dns | tls | timeout | reset | protocol | closed."""

    def __init__(self, message: str, cause: str = "protocol") -> None:
        super().__init__(message)
        self.cause = cause


class HttpTimeout(HttpError, TimeoutError):
    """Connecting, or waiting for the next bytes of an answer, took too long."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "timeout")


def _connect_cause(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return "tls"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return "reset"
    return "unknown"


DEFAULT_CONNECTIONS = 4096  # each open stream holds one: a gateway holds thousands at once


def connection_limit(options: Mapping[str, object]) -> int:
    """A provider's `max_connections` option: DEFAULT_CONNECTIONS when unset, 0 for none."""
    value = options.get("max_connections", DEFAULT_CONNECTIONS)
    limit = int(value) if isinstance(value, (int, str)) else DEFAULT_CONNECTIONS
    return limit if limit > 0 else 1 << 30


def encode_headers(headers: dict[str, str]) -> bytes:
    """Header lines for `Http1Client.request`, checked once: no CR/LF may smuggle a line."""
    lines = []
    for name, value in headers.items():
        if any(c in name + value for c in "\r\n\0") or not name or ":" in name:
            raise ValueError(f"invalid HTTP header {name!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request/response exchange at a time."""

    def __init__(self, client: Http1Client) -> None:
        self.client = client
        self.loop = client.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.in_use = False
        self.streaming = False
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.keep_alive = False
        self.headers_done = False
        self.complete = False
        self.framed = False  # Content-Length or chunked: the parser sees the end
        self.encoding = b""
        self.retry_after = b""  # the answer's Retry-After, for a 429 or 503
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.error: HttpError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.wait_started = 0.0
        self.last_read = 0.0

    # --- asyncio protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        if not self.in_use:
            # Bytes nobody asked for: the connection can no longer be trusted.
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpError(f"malformed response ({type(exc).__name__})"))
            self.abort()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.in_use and not self.complete:
            if self.headers_done and not self.framed:
                self.on_message_complete()  # the body ran to the end of the connection
            else:
                self._fail(HttpError("connection closed before the answer was complete", "reset"))
        self.client._closed(self)

    # --- parser callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self.framed = True
        elif name == b"content-encoding":
            self.encoding = value.strip().lower()
        elif name == b"retry-after":
            self.retry_after = value

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (103 Early Hints ...): the real one follows
        self.status = status
        # Asked now: once the message is complete the parser no longer knows.
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if not self.headers_done:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if (
            self.streaming
            and self.buffered > _HIGH_WATER
            and not self.paused
            and self.transport is not None
        ):
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.headers_done:
            # The interim answer ended; the final one brings its own headers.
            self.framed = False
            self.encoding = b""
            return
        self.complete = True
        self._wake()

    # --- waiting ----------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: HttpError) -> None:
        if self.error is None:
            self.error = error
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    async def wait(self) -> None:
        """Wait for the next parser event, failing if no byte arrives for read_timeout."""
        if self.error is not None:
            raise self.error
        waiter = self.loop.create_future()
        self.waiter = waiter
        self.wait_started = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_later(self.client.read_timeout, self._check_timeout)
        try:
            await waiter
        finally:
            self.waiter = None

    def _check_timeout(self) -> None:
        # One timer per wait at most, re-armed lazily instead of reset on every read.
        self._timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        since = max(self.last_read, self.wait_started)
        left = since + self.client.read_timeout - self.loop.time()
        if left > 0:
            self._timer = self.loop.call_later(left, self._check_timeout)
            return
        self._fail(HttpTimeout("no data from the upstream within the read timeout"))
        self.abort()

    def take(self) -> bytes:
        """All body bytes received so far."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    # --- lifecycle ------------------------------------------------------------------------------

    def begin(self, streaming: bool) -> None:
        self._reset()
        self.in_use = True
        self.streaming = streaming

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def end(self) -> None:
        """The exchange is over: back to the pool if the connection can carry another."""
        self.in_use = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.complete and self.usable and self.error is None:
            if self.keep_alive:
                if self.paused:
                    self.paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                self.chunks.clear()
                self.client._release(self)
                return
        self.abort()

    def abort(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None and not self.closed:
            self.transport.abort()  # connection_lost does the bookkeeping


class Response:
    """An upstream answer. `status` is known; the body is read with `read()` or `chunks()`.
    `close()` must follow (it is idempotent); it keeps the connection only if fully read."""

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.retry_after = conn.retry_after
        encoding = conn.encoding
        self._inflate = None
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            self._inflate = zlib.decompressobj(47)  # 32 + 15: zlib or gzip header
        elif encoding not in (b"", b"identity"):
            conn.end()
            self._conn = None
            raise HttpError("unsupported content-encoding")

    def _decode(self, data: bytes) -> bytes:
        if self._inflate is None:
            return data
        try:
            return self._inflate.decompress(data)
        except zlib.error:
            raise HttpError("corrupt compressed body") from None

    async def read(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise HttpError("response already closed")
        try:
            while not conn.complete:
                await conn.wait()
            data = self._decode(conn.take())
        except BaseException:
            self.close()
            raise
        self.close()
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (one item may hold several network reads)."""
        conn = self._conn
        if conn is None:
            return
        try:
            while True:
                if conn.chunks:
                    data = self._decode(conn.take())
                    if data:
                        yield data
                    continue
                if conn.complete:
                    break
                await conn.wait()
        finally:
            self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.end()


class Http1Client:
    """Keep-alive HTTP/1.1 connections to the origin of `base_url`; paths are appended to it."""

    def __init__(
        self,
        base_url: str,
        *,
        limit: int = 512,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be an http:// or https:// URL")
        self.base_url = base_url
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host.encode("idna").decode()
        default_port = self.port == (443 if self.tls else 80)
        self.host_header = (host if default_port else f"{host}:{self.port}").encode("ascii")
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_s = keepalive_s
        self._ssl = (ssl_context or ssl.create_default_context()) if self.tls else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._targets: dict[str, bytes] = {}
        self._closing = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _target(self, path: str) -> bytes:
        target = self._targets.get(path)
        if target is None:
            parts = urlsplit(self.base_url + path)
            text = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            target = self._targets[path] = text.encode("ascii")
        return target

    async def request(
        self, method: bytes, path: str, body: bytes, headers: bytes, *, stream: bool = False
    ) -> Response:
        """Send a request; returns once the status and headers are in (and, unless
        `stream`, the whole body too). `headers` comes from `encode_headers`."""
        conn = await self._acquire()
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (
            method, self._target(path), self.host_header, headers
        )  # fmt: skip
        if body or method not in (b"GET", b"HEAD"):
            head += b"Content-Length: %d\r\n" % len(body)
        conn.begin(stream)
        assert conn.transport is not None
        conn.transport.write(head + b"\r\n" + body)
        try:
            if stream:
                while not conn.headers_done:
                    await conn.wait()
            else:
                while not conn.complete:
                    await conn.wait()
        except BaseException:
            conn.end()
            raise
        return Response(conn)

    async def fetch(
        self, method: bytes, path: str, body: bytes, headers: bytes
    ) -> tuple[int, bytes]:
        response = await self.request(method, path, body, headers)
        return response.status, await response.read()

    # --- the pool ---------------------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        while True:
            if self._closing:
                raise HttpError("client closed", "closed")
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.usable and self.loop.time() - conn.idle_since < self.keepalive_s:
                    return conn
                conn.abort()
            if not self.limit or self._open < self.limit:
                return await self._connect()
            waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    given = waiter.result()
                    if given is not None:
                        self._release(given)
                    else:
                        self._slot_freed(0)  # pass the free slot on
                raise
            if handed is None:
                if not self.limit or self._open < self.limit:
                    return await self._connect()
            elif handed.usable:
                return handed
            # A handed connection closed before we woke up: try again.

    async def _connect(self) -> _Connection:
        self._open += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            self._slot_freed()
            raise HttpTimeout("connect timed out") from None
        except OSError as exc:
            self._slot_freed()
            raise HttpError(f"connect failed ({type(exc).__name__})", _connect_cause(exc)) from None
        except BaseException:
            self._slot_freed()
            raise
        return conn

    def _release(self, conn: _Connection) -> None:
        if self._closing:
            conn.abort()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        oldest = self._idle[0]
        if self.loop.time() - oldest.idle_since >= self.keepalive_s:
            self._idle.pop(0)
            oldest.abort()

    def _closed(self, conn: _Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
        self._slot_freed()

    def _slot_freed(self, count: int = 1) -> None:
        self._open -= count
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the waiter opens a connection itself
                return

    async def close(self) -> None:
        self._closing = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(HttpError("client closed", "closed"))
