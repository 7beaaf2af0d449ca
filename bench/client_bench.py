"""Which HTTP client should ApiFast use upstream? httpx, httpx2, aiohttp and ApiFast's own
plugins/providers/http1.py against the same nginx fake upstream, each in its own process on
uvloop: req/s with 32 concurrent requests, the client's CPU per request, and p50/p99 of
sequential requests; JSON and SSE answers.

    python bench/client_bench.py [--seconds 4]

Skips (exit 0) with a message when nginx is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from bench.nginx_upstream import UPSTREAM_MODEL, NginxUpstream, nginx_binary

# http1: ApiFast's own lean client (plugins/providers/http1.py), what the openai provider uses.
CLIENTS = ("aiohttp", "httpx", "httpx2", "http1")
BODY = orjson.dumps(
    {
        "model": UPSTREAM_MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 64,
    }
)
HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}

Call = Callable[[], Awaitable[int]]


async def _make_calls(
    client: str, url: str, stream: bool
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """A function doing one upstream call the way a proxy would, and a closer."""
    if client == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=30),
            skip_auto_headers=("User-Agent",),
        )

        async def aiohttp_call() -> int:
            async with session.post(url, data=BODY, headers=HEADERS) as resp:
                if stream:
                    n = 0
                    async for line in resp.content:
                        n += len(line)
                    return n
                return len(await resp.read())

        return aiohttp_call, session.close

    if client == "http1":
        from apifast.plugins.providers.http1 import Http1Client, encode_headers

        base, _, path = url.rpartition("/")
        http1 = Http1Client(base, limit=512)
        hdr = encode_headers(HEADERS)

        async def http1_call() -> int:
            if stream:
                n = 0
                response = await http1.request(b"POST", "/" + path, BODY, hdr, stream=True)
                async for chunk in response.chunks():
                    n += len(chunk)
                return n
            _, data = await http1.fetch(b"POST", "/" + path, BODY, hdr)
            return len(data)

        return http1_call, http1.close

    mod = __import__(client)
    limits = mod.Limits(max_connections=512, max_keepalive_connections=512)
    http = mod.AsyncClient(limits=limits, timeout=30)

    async def httpx_call() -> int:
        if stream:
            n = 0
            async with http.stream("POST", url, content=BODY, headers=HEADERS) as resp:
                async for line in resp.aiter_lines():
                    n += len(line)
            return n
        resp = await http.post(url, content=BODY, headers=HEADERS)
        return len(resp.content)

    return httpx_call, http.aclose


async def _measure(
    client: str, url: str, stream: bool, seconds: float, conns: int
) -> dict[str, float]:
    call, close = await _make_calls(client, url, stream)
    try:
        for _ in range(200):  # warm-up: open connections, fill caches
            await call()
        done = 0
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await call()
                done += 1

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        latencies = []
        stop_at = time.perf_counter() + seconds / 2
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t)
        latencies.sort()
        return {
            "rps": done / elapsed,
            "cpu_us": cpu / done * 1e6,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        }
    finally:
        await close()


def _child(args: argparse.Namespace) -> int:
    import uvloop

    result = uvloop.run(
        _measure(args.client, args.url, args.stream, args.seconds, args.connections)
    )
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=float, default=4)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        return _child(args)
    if nginx_binary() is None:
        print("SKIP client benchmark: nginx is not installed (Debian: apt-get install -y nginx)")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="apifast-clients-") as tmp:
        upstream = NginxUpstream(Path(tmp)).start()
        try:
            for stream in (False, True):
                base = upstream.stream_base_url if stream else upstream.base_url
                for client in args.clients.split(","):
                    try:
                        __import__(client if client != "http1" else "httptools")
                    except ImportError:
                        rows.append((client, stream, None))
                        continue
                    cmd = [sys.executable, __file__, "--client", client, "--url",
                           base + "/chat/completions", "--seconds", str(args.seconds),
                           "--connections", str(args.connections)]  # fmt: skip
                    if stream:
                        cmd.append("--stream")
                    out = subprocess.run(
                        cmd, capture_output=True, text=True, timeout=args.seconds * 3 + 60
                    )
                    if out.returncode != 0:
                        raise RuntimeError(f"{client}: {out.stderr[-800:]}")
                    rows.append((client, stream, json.loads(out.stdout.strip().splitlines()[-1])))
        finally:
            upstream.stop()
    print()
    print(f"{'client':<9} {'answer':<6} {'req/s @' + str(args.connections):>11} {'CPU us/req':>11} "
          f"{'p50 ms @1':>10} {'p99 ms @1':>10}")  # fmt: skip
    for client, stream, r in rows:
        kind = "SSE" if stream else "JSON"
        if r is None:
            print(f"{client:<9} {kind:<6} {'not installed':>11}")
            continue
        print(f"{client:<9} {kind:<6} {r['rps']:>11,.0f} {r['cpu_us']:>11,.0f} "
              f"{r['p50_ms']:>10.3f} {r['p99_ms']:>10.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
