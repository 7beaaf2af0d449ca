"""ApiFast's proxy overhead, in one run: the same chat calls made directly to a fake upstream
(nginx serving fixed answers), through the bare hop (bench/bare_hop.py: the thinnest Python
proxy) and through ApiFast (`apifast serve` on real Postgres and NATS, holds on, as in
production), non-streaming and streaming; then the same call through ApiFast's other client
protocols (/v1/messages, /v1/responses). Prints req/s at 32 connections and p50/p99 latency
at one connection (sequential requests), ApiFast's throughput as a ratio of the bare hop's,
its added latency over direct, and whether each target of bench/README.md holds. The runs
alternate over 3 rounds; every figure is the median of the rounds.

    python bench/proxy_bench.py            # about two minutes; see bench/README.md

Skips (exit 0) with a message when nginx, wrk, Postgres or NATS is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python bench/proxy_bench.py`: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import httpx
import orjson

from bench.apifast_server import CHAT_MODEL, STREAM_MODEL, ApiFastServer
from bench.bare_hop import HopProcess
from bench.nginx_upstream import UPSTREAM_MODEL, NginxUpstream, nginx_binary
from bench.wrk import WrkResult, run_wrk, wrk_binary

LITELLM_RPS = 150  # LiteLLM 1.108.7, one worker, nginx fake, on these 2-core machines
# Targets (floors), per scenario: throughput at 32 connections as a share of the bare hop's,
# added p50 at one connection (ms), added p99 at one connection (ms).
TARGET_HOP_SHARE = {"non-stream": 0.5, "stream": 0.4}
TARGET_ADDED_P50_MS = {"non-stream": 0.3, "stream": 0.4}
TARGET_ADDED_P99_MS = 2.0
TARGET_PROTOCOL_SHARE = 0.9  # /v1/messages and /v1/responses within 10% of chat

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say hello to the benchmark in a few words."},
]


def request_body(model: str, stream: bool) -> bytes:
    body: dict[str, object] = {"model": model, "messages": MESSAGES, "max_tokens": 64}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def protocol_body(protocol: str) -> bytes:
    """The same call as request_body(CHAT_MODEL, False), in another client protocol."""
    system, user = MESSAGES[0]["content"], MESSAGES[1]["content"]
    if protocol == "messages":
        return orjson.dumps({"model": CHAT_MODEL, "max_tokens": 64, "system": system,
                             "messages": [{"role": "user", "content": user}]})  # fmt: skip
    return orjson.dumps({"model": CHAT_MODEL, "max_output_tokens": 64,
                         "instructions": system, "input": user})  # fmt: skip


@dataclass
class Scenario:
    name: str
    stream: bool


SCENARIOS = (Scenario("non-stream", False), Scenario("stream", True))
PROTOCOLS = {"messages": "/v1/messages", "responses": "/v1/responses"}


@dataclass
class Measured:
    throughput: WrkResult
    sequential: WrkResult
    cpu_us_per_request: float | None = None  # the server's CPU time, at 32 connections
    cpu_us_sequential: float | None = None  # the same at one connection


def skip(reason: str) -> int:
    print(f"SKIP proxy benchmark: {reason}")
    return 0


async def _reachable(dsn: str, nats_url: str) -> str | None:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
        await conn.close()
    except Exception as exc:
        return f"Postgres at {dsn} is not reachable ({type(exc).__name__})"
    import nats

    try:
        nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0)
        await nc.jetstream().account_info()
        await nc.close()
    except Exception as exc:
        return f"NATS JetStream at {nats_url} is not reachable ({type(exc).__name__})"
    return None


def _write_bodies(workdir: Path) -> dict[tuple[str, bool], Path]:
    files: dict[tuple[str, bool], Path] = {}
    for target, chat, stream_model in (
        ("direct", UPSTREAM_MODEL, UPSTREAM_MODEL),
        ("apifast", CHAT_MODEL, STREAM_MODEL),
    ):
        for stream in (False, True):
            path = workdir / f"{target}-{'stream' if stream else 'plain'}.json"
            path.write_bytes(request_body(stream_model if stream else chat, stream))
            files[target, stream] = path
    for protocol in PROTOCOLS:
        path = workdir / f"apifast-{protocol}.json"
        path.write_bytes(protocol_body(protocol))
        files[protocol, False] = path
    return files


def _measure(
    url: str, body: Path, args: argparse.Namespace, key: str = "",
    server: ApiFastServer | HopProcess | None = None, profile: Path | None = None,
) -> Measured:  # fmt: skip
    """`profile`: py-spy the server during the 32-connection run, or with
    --profile-one-conn during the one-connection run."""
    cpu = [0.0, 0.0, 0.0]
    profiler = None
    if profile is not None and isinstance(server, ApiFastServer) and not args.profile_one_conn:
        profiler = _profile(server, args.seconds, profile)
    cpu[0] = server.cpu_seconds() if server else 0.0
    many = run_wrk(url, body, connections=args.connections, seconds=args.seconds, key=key)
    cpu[1] = server.cpu_seconds() if server else 0.0
    if profile is not None and isinstance(server, ApiFastServer) and args.profile_one_conn:
        profiler = _profile(server, args.latency_seconds, profile)
    one = run_wrk(url, body, connections=1, seconds=args.latency_seconds, key=key)
    cpu[2] = server.cpu_seconds() if server else 0.0
    if profiler is not None:
        profiler.wait(timeout=60)
        print(f"profile written to {profile}")
    for run in (many, one):
        if run.errors:
            raise RuntimeError(f"{run.errors} failed requests against {url}")
    if server is None:
        return Measured(many, one)
    return Measured(
        many,
        one,
        (cpu[1] - cpu[0]) / max(1, many.requests) * 1e6,
        (cpu[2] - cpu[1]) / max(1, one.requests) * 1e6,
    )


async def _check_apifast(server: ApiFastServer, bodies: dict[tuple[str, bool], Path]) -> None:
    """One call of each kind, to be sure the benchmark measures real, priced answers."""
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=10) as c:
        r = await c.post("/v1/chat/completions", content=bodies["apifast", False].read_bytes())
        if r.status_code != 200 or "cost" not in r.json().get("usage", {}):
            raise RuntimeError(f"ApiFast answered {r.status_code}: {r.text[:200]}")
        r = await c.post("/v1/chat/completions", content=bodies["apifast", True].read_bytes())
        if (
            r.status_code != 200
            or not r.text.endswith("data: [DONE]\n\n")
            or '"cost"' not in r.text
        ):
            raise RuntimeError(f"ApiFast stream answered {r.status_code}: {r.text[:200]}")


def _profile(server: ApiFastServer, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists() or server.proc is None:
        print("py-spy not found; --profile ignored")
        return None
    fmt = {".json": "speedscope", ".txt": "raw"}.get(out.suffix, "flamegraph")
    return subprocess.Popen(
        [py_spy, "record", "-p", str(server.proc.pid), "-o", str(out), "-f", fmt,
         "-d", str(max(1, int(seconds))), "-r", "250",
         # --native (C frames too) pauses the process for each sample: slower, but it shows
         # where the event loop's own time goes.
         *(["--native"] if os.environ.get("APIFAST_BENCH_PROFILE_NATIVE") else ["--nonblocking"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, dict[str, Measured]]:
    with tempfile.TemporaryDirectory(prefix="apifast-bench-") as tmp:
        workdir = Path(tmp)
        bodies = _write_bodies(workdir)
        upstream = NginxUpstream(workdir).start()
        hop = HopProcess(f"http://127.0.0.1:{upstream.port}").start()
        rounds: dict[str, dict[str, list[Measured]]] = {"direct": {}, "hop": {}, "apifast": {}}
        try:
            server = ApiFastServer(workdir, upstream, args.database_url, args.nats_url)
            try:
                await server.start()
                await _check_apifast(server, bodies)
                url = server.base_url + "/v1/chat/completions"
                for sc in SCENARIOS:
                    # Warm-up: connection pools, statement caches, the allocator.
                    run_wrk(url, bodies["apifast", sc.stream], connections=args.connections,
                            seconds=args.warmup_seconds, key=server.key)  # fmt: skip
                    run_wrk(_hop_url(hop, sc), bodies["direct", sc.stream],
                            connections=args.connections, seconds=args.warmup_seconds)  # fmt: skip
                # The runs alternate, so that all see the machine in the same state.
                for n in range(args.rounds):
                    for sc in SCENARIOS:
                        if not args.skip_direct:
                            base = upstream.stream_base_url if sc.stream else upstream.base_url
                            rounds["direct"].setdefault(sc.name, []).append(_measure(
                                base + "/chat/completions", bodies["direct", sc.stream], args
                            ))  # fmt: skip
                            rounds["hop"].setdefault(sc.name, []).append(_measure(
                                _hop_url(hop, sc), bodies["direct", sc.stream], args, "", hop
                            ))  # fmt: skip
                        profile = (
                            Path(args.profile) if args.profile and not sc.stream and n == 0
                            else None
                        )  # fmt: skip
                        rounds["apifast"].setdefault(sc.name, []).append(_measure(
                            url, bodies["apifast", sc.stream], args, server.key, server, profile
                        ))  # fmt: skip
                    for protocol, path in PROTOCOLS.items():
                        rounds["apifast"].setdefault(protocol, []).append(_measure(
                            server.base_url + path, bodies[protocol, False], args, server.key,
                            server,
                        ))  # fmt: skip
            finally:
                await server.stop()
        finally:
            hop.stop()
            upstream.stop()
        return {t: {s: _median(ms) for s, ms in per.items()} for t, per in rounds.items()}


def _hop_url(hop: HopProcess, sc: Scenario) -> str:
    return hop.origin + ("/sse/v1" if sc.stream else "/v1") + "/chat/completions"


def _median(runs: list[Measured]) -> Measured:
    """Each figure's median over the rounds (CPU included)."""

    def mid(values: list[float]) -> float:
        return statistics.median(values)

    def wrk(results: list[WrkResult]) -> WrkResult:
        return WrkResult(
            requests=round(mid([r.requests for r in results])),
            duration_s=mid([r.duration_s for r in results]),
            p50_ms=mid([r.p50_ms for r in results]),
            p90_ms=mid([r.p90_ms for r in results]),
            p99_ms=mid([r.p99_ms for r in results]),
            errors=sum(r.errors for r in results),
            rps_measured=mid([r.rps for r in results]),
        )

    cpu = [r.cpu_us_per_request for r in runs if r.cpu_us_per_request is not None]
    cpu1 = [r.cpu_us_sequential for r in runs if r.cpu_us_sequential is not None]
    return Measured(
        wrk([r.throughput for r in runs]),
        wrk([r.sequential for r in runs]),
        mid(cpu) if cpu else None,
        mid(cpu1) if cpu1 else None,
    )


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(results: dict[str, dict[str, Measured]], args: argparse.Namespace) -> bool:
    rows: list[tuple[str, ...]] = []
    checks: list[tuple[str, bool | None]] = []
    for sc in SCENARIOS:
        d = results["direct"].get(sc.name)
        h = results["hop"].get(sc.name)
        a = results["apifast"][sc.name]
        share = a.throughput.rps / h.throughput.rps if h else None
        rows.append((
            f"{sc.name:<10} req/s @{args.connections} conns",
            _fmt(d.throughput.rps if d else None, 0), _fmt(h.throughput.rps if h else None, 0),
            _fmt(a.throughput.rps, 0), f"{share:.3f}x" if share else "-", "", "",
        ))  # fmt: skip
        target = TARGET_HOP_SHARE[sc.name]
        checks.append((f"{sc.name} req/s >= {target} x the bare hop's",
                       None if share is None else share >= target))  # fmt: skip
        for label, attr in (("p50", "p50_ms"), ("p99", "p99_ms")):
            dv = getattr(d.sequential, attr) if d else None
            hv = getattr(h.sequential, attr) if h else None
            av = getattr(a.sequential, attr)
            added = av - dv if dv is not None else None
            rows.append((
                f"{sc.name:<10} {label} ms @1 conn",
                _fmt(dv, 3), _fmt(hv, 3), _fmt(av, 3), "",
                f"+{hv - dv:.3f} ms" if hv is not None and dv is not None else "-",
                f"+{added:.3f} ms" if added is not None else "-",
            ))  # fmt: skip
            limit = TARGET_ADDED_P50_MS[sc.name] if label == "p50" else TARGET_ADDED_P99_MS
            checks.append((f"{sc.name} added {label} <= {limit} ms",
                           None if added is None else added <= limit))  # fmt: skip
    chat = results["apifast"]["non-stream"]
    for protocol, path in PROTOCOLS.items():
        m = results["apifast"][protocol]
        share = m.throughput.rps / chat.throughput.rps
        rows.append((
            f"{path:<16} req/s @{args.connections}", "-", "-", _fmt(m.throughput.rps, 0),
            f"{share:.3f}x chat", "", f"p50 {m.sequential.p50_ms:.3f} ms",
        ))  # fmt: skip
        checks.append((f"{path} within 10% of chat", share >= TARGET_PROTOCOL_SHARE))
    header = ("", "direct", "bare hop", "ApiFast", "ApiFast/hop", "hop added", "ApiFast added")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)

    def show(cells: tuple[str, ...]) -> None:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(cells, widths, strict=True))))  # fmt: skip

    print()
    show(header)
    print(line)
    for r in rows:
        show(r)
    print(line)
    print(f"(medians of {args.rounds} rounds; the runs alternate; added = over direct)")
    for name in ("non-stream", "stream", *PROTOCOLS):
        a = results["apifast"][name]
        h = results["hop"].get(name)
        hop_cpu = (
            f"; bare hop {_fmt(h.cpu_us_per_request, 0)} us, {_fmt(h.cpu_us_sequential, 0)} us"
            if h
            else ""
        )
        print(f"ApiFast CPU per {name} request: {_fmt(a.cpu_us_per_request, 0)} us at "
              f"{args.connections} conns, {_fmt(a.cpu_us_sequential, 0)} us at 1{hop_cpu}")  # fmt: skip
    verdict = {True: "met", False: "NOT met", None: "not checked (no direct run)"}
    for name, ok in checks:
        print(f"target {name}: {verdict[ok]}")
    print(f"(LiteLLM's proxy does ~{LITELLM_RPS} req/s here)")
    return all(ok for _, ok in checks)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3, help="median of this many rounds (default 3)")
    p.add_argument("--seconds", type=float, default=5, help="each 32-connection run (default 5)")
    p.add_argument("--latency-seconds", type=float, default=3, help="each 1-connection run")
    p.add_argument("--warmup-seconds", type=float, default=2)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument(
        "--database-url",
        default=os.environ.get("APIFAST_BENCH_DATABASE_URL")
        or os.environ.get("APIFAST_TEST_DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres",
        help="an admin DSN; the bench creates and drops its own database",
    )
    p.add_argument(
        "--nats-url",
        default=os.environ.get("APIFAST_BENCH_NATS_URL")
        or os.environ.get("APIFAST_TEST_NATS_URL")
        or "nats://127.0.0.1:4222",
    )
    p.add_argument("--skip-direct", action="store_true", help="measure ApiFast only")
    p.add_argument(
        "--profile",
        help="py-spy the server during the non-stream 32-conn run (.svg, .json speedscope, "
        ".txt collapsed stacks)",
    )
    p.add_argument(
        "--profile-one-conn", action="store_true",
        help="with --profile: record the one-connection (latency) run instead",
    )  # fmt: skip
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if nginx_binary() is None:
        return skip("nginx is not installed (Debian: apt-get install -y nginx)")
    if wrk_binary() is None:
        return skip("wrk is not installed (Debian: apt-get install -y wrk)")
    unreachable = asyncio.run(_reachable(args.database_url, args.nats_url))
    if unreachable:
        return skip(unreachable)
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError as exc:
        return skip(f"{exc.name} is not installed; ApiFast serves with uvloop and httptools")
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    results = asyncio.run(run(args))
    print_table(results, args)
    # Everything shares the machine's cores: other load skews the figures.
    print(f"(benchmark took {time.monotonic() - started:.0f} s on {os.cpu_count()} CPUs; "
          f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after)")  # fmt: skip
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(
            {t: {s: {"rps_32": m.throughput.rps, "p50_ms_1": m.sequential.p50_ms,
                     "p99_ms_1": m.sequential.p99_ms, "cpu_us": m.cpu_us_per_request,
                     "cpu_us_1": m.cpu_us_sequential}
                 for s, m in r.items()} for t, r in results.items()},
            option=orjson.OPT_INDENT_2,
        ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
