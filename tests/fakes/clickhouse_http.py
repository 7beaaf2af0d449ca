"""The ClickHouse HTTP interface over the real chdb engine, in a process of its own: what lets
several meter processes share ONE ClickHouse where there is no ClickHouse server binary
(chdb is one process per data path). Only what clickhouse-connect uses is served: queries
by URL parameter and/or body, `database`, bound `param_*`, a trailing FORMAT, inserts whose
body is the data (run as INSERT ... FROM INFILE, as clickhouse-connect's chdb backend does),
and errors as a 500 with ClickHouse's `Code: N.` text. Responses are never compressed: the
client connects with `compress=false`.

For the fault tests, `POST /__hold` holds every insert that arrives afterwards *after its
body is read*, until `POST /__release`: a meter can then be killed between sending its
ClickHouse write and acking, and the write still lands. `GET /__held` counts the inserts
held or running.

    python -m tests.fakes.clickhouse_http <chdb path> <port>
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE | re.DOTALL)
_INSERT = re.compile(r"^\s*INSERT\s+INTO\b", re.IGNORECASE)
# An insert whose statement leads the body: the rows follow its FORMAT clause.
_INSERT_HEAD = re.compile(rb"^(\s*INSERT\s+INTO\b.*?\bFORMAT\s+\w+)[ \t]*\r?\n?",
                          re.IGNORECASE | re.DOTALL)  # fmt: skip
_CODE = re.compile(r"Code: (\d+)")
_TRANSPORT = {"database", "query", "default_format", "compress", "decompress", "session_id",
              "session_timeout", "session_check", "query_id", "wait_end_of_query",
              "client_protocol_version", "enable_http_compression",
              "send_progress_in_http_headers", "http_headers_progress_interval_ms"}  # fmt: skip


class Engine:
    def __init__(self, path: str) -> None:
        import chdb

        self.conn = chdb.connect(path)
        self.lock = threading.Lock()  # chdb: one call at a time
        self.database = ""
        self.release = threading.Event()
        self.release.set()
        self.held = 0

    def run(self, sql: str, fmt: str, params: dict[str, str], database: str) -> Any:
        with self.lock:
            if database and database != self.database:
                self.conn.query(f"USE `{database}`", "TabSeparated")
                self.database = database
            return self.conn.query(sql, fmt, params=params)


def handler(engine: Engine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._handle(b"")

        def do_POST(self) -> None:
            self._handle(self._body())

        def _body(self) -> bytes:
            """The whole body; a client gone mid-body (killed) raises: nothing is run."""
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                chunks = []
                while True:
                    line = self.rfile.readline()
                    if not line.endswith(b"\n"):
                        raise ConnectionError("the body ended before its last chunk")
                    size = int(line.split(b";")[0].strip(), 16)
                    if not size:
                        self.rfile.readline()  # the empty line after the last chunk
                        return b"".join(chunks)
                    chunk = self.rfile.read(size)
                    if len(chunk) < size or not self.rfile.readline().endswith(b"\n"):
                        raise ConnectionError("the body ended inside a chunk")
                    chunks.append(chunk)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if len(body) < length:
                raise ConnectionError("the body ended early")
            return body

        def _handle(self, body: bytes) -> None:
            url = urlsplit(self.path)
            if url.path == "/ping":
                return self._reply(200, b"Ok.\n")
            if url.path == "/__hold":
                engine.release.clear()
                return self._reply(200, b"held\n")
            if url.path == "/__release":
                engine.release.set()
                return self._reply(200, b"released\n")
            if url.path == "/__held":
                return self._reply(200, str(engine.held).encode())
            args = dict(parse_qsl(url.query, keep_blank_values=True))
            params = {k[6:]: v for k, v in args.items() if k.startswith("param_")}
            query = args.get("query", "")
            data = b""
            head = _INSERT_HEAD.match(body[:65536]) if not query and body else None
            if query and _INSERT.match(query) and body:
                data = body  # the rows; the statement is in the URL
            elif head is not None:
                query, data = head.group(1).decode(), body[head.end() :]
            elif body:
                query = f"{query} {body.decode()}" if query else body.decode()
            try:
                result = self._execute(query, data, params, args)
            except Exception as exc:
                message = str(exc)
                code = _CODE.search(message)
                return self._reply(500, message.encode(), {
                    "X-ClickHouse-Exception-Code": code.group(1) if code else "1000",
                })  # fmt: skip
            out = result.bytes() if result is not None else b""
            summary = {"read_rows": "0", "read_bytes": "0", "written_rows": "0",
                       "written_bytes": "0", "total_rows_to_read": "0", "result_rows": "0",
                       "result_bytes": "0", "elapsed_ns": "0"}  # fmt: skip
            self._reply(200, out, {
                "X-ClickHouse-Summary": json.dumps(summary),
                "X-ClickHouse-Timezone": "UTC",
                "X-ClickHouse-Query-Id": "shim",
                "X-ClickHouse-Server-Display-Name": "chdb-http-shim",
                "X-ClickHouse-Format": self._format or "TabSeparated",
            })  # fmt: skip

        _format: str | None = None

        def _execute(self, query: str, data: bytes, params: dict[str, str],
                     args: dict[str, str]) -> Any:  # fmt: skip
            database = args.get("database", "")
            match = _FORMAT.search(query)
            fmt = match.group(1) if match else args.get("default_format", "TabSeparated")
            self._format = fmt
            if data:
                with tempfile.NamedTemporaryFile(suffix=".bin") as tmp:
                    tmp.write(data)
                    tmp.flush()
                    assert match is not None, "an insert with data names its FORMAT"
                    head = query[: match.start()].rstrip()
                    engine.held += 1  # until it is stored
                    try:
                        engine.release.wait()
                        engine.run(f"{head} FROM INFILE '{tmp.name}' FORMAT {fmt}",
                                   "TabSeparated", params, database)  # fmt: skip
                    finally:
                        engine.held -= 1
                return None
            sql = query[: match.start()].rstrip() if match else query
            return engine.run(sql, fmt, params, database)

    return Handler


def main() -> None:
    path, port = sys.argv[1], int(sys.argv[2])
    server = ThreadingHTTPServer(("127.0.0.1", port), handler(Engine(path)))
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
