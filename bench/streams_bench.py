"""Memory per open stream: 1,000 concurrent chat streams held open through ApiFast, against
the same streams through the bare hop (bench/bare_hop.py), in one run.

A slow fake upstream (aiohttp, in this process) answers each stream with its first chunk,
then holds it open until every stream is open; then it sends the rest. The router's RSS is
read (Linux /proc) once warm and again with all streams open: the growth divided by the
number of streams is the memory one open stream costs. Every stream must then finish with
its usage and [DONE]: a single error fails the run.

    python bench/streams_bench.py [--streams 1000]

Skips (exit 0) with a message when Postgres or NATS is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import orjson
from aiohttp import web

from bench.apifast_server import STREAM_MODEL, ApiFastServer
from bench.bare_hop import HopProcess

TARGET_KB_PER_STREAM = 50


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    return f"data: {data}\n\n".encode()


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip


class SlowUpstream:
    """Streams that wait for `release` after their first chunk."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.open = 0
        self.runner: web.AppRunner | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    stream_base_url = base_url  # ApiFastServer's catalog routes both models here

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_sse(_chunk({"role": "assistant", "content": ""})))
        self.open += 1
        await self.release.wait()
        for word in ("Hello", " there", "."):
            await response.write(_sse(_chunk({"content": word})))
        await response.write(_sse(_chunk({}, "stop")))
        usage = {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}
        await response.write(_sse({**_chunk({}), "choices": [], "usage": usage}))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response

    async def start(self) -> SlowUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, backlog=4096).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
    first: asyncio.Event, counter: list[int], wanted: int,
) -> bytes:  # fmt: skip
    async with session.post(url, data=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"stream answered {r.status}: {(await r.read())[:200]!r}")
        received = b""
        async for chunk in r.content.iter_any():
            if not received:
                counter[0] += 1
                if counter[0] == wanted:
                    first.set()
            received += chunk
        return received


async def measure(
    name: str, pid: int, url: str, body: bytes, key: str, upstream: SlowUpstream, streams: int
) -> tuple[int, int, float]:
    """(baseline RSS KB, RSS KB with `streams` open, KB per stream)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for warm in (50, 50):  # warm: pools, caches, the allocator's arenas
            upstream.release.set()
            done = asyncio.Event()
            await asyncio.gather(*(
                _one_stream(session, url, body, headers, done, [0], warm) for _ in range(warm)
            ))  # fmt: skip
        await asyncio.sleep(0.5)
        base = rss_kb(pid)
        upstream.release.clear()
        all_open = asyncio.Event()
        counter = [0]
        tasks = [
            asyncio.create_task(
                _one_stream(session, url, body, headers, all_open, counter, streams)
            )
            for _ in range(streams)
        ]
        try:
            await asyncio.wait_for(all_open.wait(), 60)
        except TimeoutError:
            raise RuntimeError(f"{name}: only {counter[0]} of {streams} streams opened") from None
        await asyncio.sleep(0.5)
        peak = rss_kb(pid)
        upstream.release.set()
        bodies = await asyncio.gather(*tasks)
    bad = [b for b in bodies if not b.rstrip().endswith(b"data: [DONE]")]
    if bad:
        raise RuntimeError(f"{name}: {len(bad)} of {streams} streams did not finish")
    return base, peak, (peak - base) / streams


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="apifast-streams-") as tmp:
        upstream = await SlowUpstream().start()
        body = orjson.dumps({
            "model": STREAM_MODEL, "stream": True, "max_tokens": 16,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Say hello."}],
        })  # fmt: skip
        hop = HopProcess(f"http://127.0.0.1:{upstream.port}").start()
        server = ApiFastServer(Path(tmp), upstream, args.database_url, args.nats_url)  # type: ignore[arg-type]
        try:
            await server.start()
            assert hop.proc is not None and server.proc is not None
            hop_url = hop.origin + "/v1/chat/completions"
            url = server.base_url + "/v1/chat/completions"
            results = {
                "bare hop": await measure(
                    "bare hop", hop.proc.pid, hop_url, body, "", upstream, args.streams
                ),
                "ApiFast": await measure(
                    "ApiFast", server.proc.pid, url, body, server.key, upstream, args.streams
                ),
            }
        finally:
            await server.stop()
            hop.stop()
            await upstream.stop()
    print(f"\n{args.streams} concurrent open streams, all finished without an error")
    print(f"{'':10}  {'RSS warm':>10}  {'RSS open':>10}  {'per stream':>11}")
    for name, (base, peak, per) in results.items():
        print(f"{name:10}  {base:>7,} KB  {peak:>7,} KB  {per:>8.1f} KB")
    per = results["ApiFast"][2]
    verdict = "met" if per <= TARGET_KB_PER_STREAM else "NOT met"
    print(f"target ApiFast RSS growth <= {TARGET_KB_PER_STREAM} KB per open stream: {verdict}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--database-url", default=os.environ.get("APIFAST_BENCH_DATABASE_URL")
                   or os.environ.get("APIFAST_TEST_DATABASE_URL")
                   or "postgresql://postgres@127.0.0.1:5432/postgres")  # fmt: skip
    p.add_argument("--nats-url", default=os.environ.get("APIFAST_BENCH_NATS_URL")
                   or os.environ.get("APIFAST_TEST_NATS_URL") or "nats://127.0.0.1:4222")  # fmt: skip
    args = p.parse_args(argv)
    from bench.proxy_bench import _reachable

    unreachable = asyncio.run(_reachable(args.database_url, args.nats_url))
    if unreachable:
        print(f"SKIP streams benchmark: {unreachable}")
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
