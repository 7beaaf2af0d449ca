"""A fake OpenAI upstream that costs almost no CPU: nginx serving fixed answers.

nginx cannot switch on the request body, so the stream is served on its own path:
`/v1/chat/completions` answers JSON, `/sse/v1/chat/completions` answers an SSE stream.
The catalog routes the streaming model to the `/sse/v1` base URL.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import orjson

from bench.children import stop_child, wait_listening

UPSTREAM_MODEL = "upstream-model"
WORDS = ["Hello", " from", " the", " fake", " upstream", " model"]
PROMPT_TOKENS = 21


def _usage() -> dict[str, object]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": len(WORDS),
        "total_tokens": PROMPT_TOKENS + len(WORDS),
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def completion_json() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": UPSTREAM_MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(WORDS), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(),
        }
    )


def stream_sse() -> bytes:
    """What OpenAI sends for a short answer with `stream_options.include_usage`."""

    def chunk(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
        return {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": UPSTREAM_MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w}) for w in WORDS]
    events.append(chunk({}, "stop"))
    events.append(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": UPSTREAM_MODEL,
            "choices": [],
            "usage": _usage(),
        }
    )
    out = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return out + b"data: [DONE]\n\n"


def _nginx_string(body: bytes) -> str:
    # nginx quoted strings: escape backslashes and the quote; newlines as \n escapes.
    text = body.decode()
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def nginx_conf(prefix: Path, port: int) -> str:
    return f"""
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_buffer_size 64k;
    server_tokens off;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 {_nginx_string(completion_json())};
        }}
        location = /sse/v1/chat/completions {{
            default_type text/event-stream;
            return 200 {_nginx_string(stream_sse())};
        }}
        location = /v1/models {{
            default_type application/json;
            return 200 '{{"object":"list","data":[]}}';
        }}
    }}
}}
"""


class NginxUpstream:
    """nginx as our own child process on a free 127.0.0.1 port; stopped by its PID."""

    def __init__(self, workdir: Path) -> None:
        self.prefix = workdir / "nginx"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def stream_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sse/v1"

    def start(self) -> NginxUpstream:
        binary = nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx")
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(nginx_conf(self.prefix, self.port))
        self.proc = subprocess.Popen(
            [binary, "-p", str(self.prefix), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_listening(self.proc, self.port, "nginx", 10)
        return self

    def stop(self) -> None:
        stop_child(self.proc)
        self.proc = None
