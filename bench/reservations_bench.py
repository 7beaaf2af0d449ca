"""What do reservations cost in throughput? The same `apifast serve`, against the same nginx
fake upstream and Postgres, once as shipped (each request holds its bound atomically in one
plpgsql call: a row lock, an UPDATE and an INSERT) and once with that call swapped for a plain
key lookup (a benchmark-only build; never run it for real: it holds no money). Both serve
non-streaming chat at 32 connections from one key, the worst case for the key's row lock.
Runs alternate (A B A B ...) and the medians are compared. Balance leases are off in both
(`APIFAST_LEASE_SHARE=0`), so every request takes its own hold; `bench/leases_bench.py`
measures the leases.

    python bench/reservations_bench.py [--rounds 5] [--seconds 6]

Target: reservations cost at most 15% of the requests per second.
Skips (exit 0) with a message when nginx, wrk, Postgres or NATS is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python bench/reservations_bench.py`: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.apifast_server import CHAT_MODEL, ApiFastServer
from bench.nginx_upstream import NginxUpstream, nginx_binary
from bench.proxy_bench import _reachable, request_body
from bench.wrk import run_wrk, wrk_binary

TARGET_COST = 0.15


# --- the benchmark-only server ---------------------------------------------------------------


def install_plain_lookup() -> None:
    """Replace the reservation with a read-only key lookup everywhere it is referenced."""
    from decimal import Decimal

    import asyncpg

    from apifast.errors import ApiError
    from apifast.router import reservations

    original = reservations.reserve

    async def lookup(
        pool: asyncpg.Pool, key_hash: bytes, generation_id: str, min_usd: Decimal,
        max_usd: Decimal, ttl_s: int, *_: object, **__: object,
    ) -> reservations.Hold:  # fmt: skip
        row = await pool.fetchrow(
            "SELECT id, balance_usd - reserved_usd AS available, rpm_limit, tpm_limit "
            "FROM api_keys WHERE key_hash = $1",
            key_hash,
        )
        if row is None:
            raise ApiError(401, "Invalid API key.", code="invalid_api_key")
        return reservations.Hold(
            key_id=row["id"], reserved=max_usd, available=row["available"],
            rpm_limit=row["rpm_limit"], tpm_limit=row["tpm_limit"],
        )  # fmt: skip

    async def lookup_method(
        self: reservations.Reserver, key_hash: bytes, generation_id: str, min_usd: Decimal,
        max_usd: Decimal, *_: object,
    ) -> reservations.Hold:  # fmt: skip
        return await lookup(self.pool, key_hash, generation_id, min_usd, max_usd, self.ttl_s)

    reservations.Reserver.reserve = lookup_method  # type: ignore[method-assign]
    import apifast.server.app  # noqa: F401 - imports every module that may hold a reference

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("apifast.router"):
            for name, value in list(vars(module).items()):
                if value is original:
                    setattr(module, name, lookup)


def serve(mode: str) -> int:
    if mode == "plain":
        install_plain_lookup()
    from apifast.cli.main import main

    return main(["serve"])


class BenchServer(ApiFastServer):
    """`apifast serve` through this module, with or without reservations."""

    def __init__(self, *args: object, mode: str) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.mode = mode

    def env(self) -> dict[str, str]:
        # Leases off: a key this busy would be served from its balance lease after its first
        # 200 requests, and both builds would measure the lease instead of the hold.
        return {**super().env(), "APIFAST_LEASE_SHARE": "0"}

    async def start(self) -> BenchServer:
        await self._prepare_database()
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - a fork, once, before measuring
            [sys.executable, "-m", "bench.reservations_bench", "--serve", self.mode],
            env=self.env(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError("server exited: " + self.log_path.read_text()[-2000:])
                try:
                    r = await client.get(self.base_url + "/healthz")
                    if r.status_code == 200 and r.json().get("nats") == "ok":
                        return self
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"server did not become healthy; see {self.log_path}")


# --- the measurement -------------------------------------------------------------------------


async def _settle_all(server: BenchServer) -> None:
    import asyncpg

    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute("DELETE FROM reservations")
        await conn.execute("UPDATE api_keys SET reserved_usd = 0")
        await conn.execute("VACUUM ANALYZE api_keys, reservations")
    finally:
        await conn.close()


async def _held(server: BenchServer) -> int:
    import asyncpg

    conn = await asyncpg.connect(server.dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM reservations"))
    finally:
        await conn.close()


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"reserve": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="apifast-resv-bench-") as tmp:
        workdir = Path(tmp)
        body = workdir / "chat.json"
        body.write_bytes(request_body(CHAT_MODEL, False))
        upstream = NginxUpstream(workdir).start()
        try:
            servers = {}
            for mode in ("reserve", "plain"):
                (workdir / mode).mkdir()
                servers[mode] = BenchServer(
                    workdir / mode, upstream, args.database_url, args.nats_url, mode=mode
                )
                await servers[mode].start()
            try:
                for server in servers.values():
                    url = server.base_url + "/v1/chat/completions"
                    run_wrk(url, body, connections=args.connections,
                            seconds=args.warmup_seconds, key=server.key)  # fmt: skip
                for _ in range(args.rounds):
                    for mode, server in servers.items():
                        # The meter settles holds as it goes; no meter runs here, so the
                        # previous round's holds are settled (dropped) between rounds.
                        await _settle_all(server)
                        url = server.base_url + "/v1/chat/completions"
                        r = run_wrk(url, body, connections=args.connections,
                                    seconds=args.seconds, key=server.key)  # fmt: skip
                        if r.errors:
                            raise RuntimeError(f"{r.errors} failed requests ({mode})")
                        results[mode].append(r.rps)
                        print(f"  {mode:<8} {r.rps:>9,.0f} req/s  p50 {r.p50_ms:.2f} ms")
                # One connection, sequential requests: a lone hold must not wait for company.
                for mode, server in servers.items():
                    url = server.base_url + "/v1/chat/completions"
                    r = run_wrk(url, body, connections=1, seconds=args.latency_seconds,
                                key=server.key)  # fmt: skip
                    results[f"{mode} p50 ms"] = [r.p50_ms]
                    print(f"  {mode:<8} 1 connection: p50 {r.p50_ms:.3f} ms  p99 {r.p99_ms:.3f} ms")
                # Sanity: the real build held money for its requests, the other did not.
                if not await _held(servers["reserve"]) or await _held(servers["plain"]):
                    raise RuntimeError("the two builds did not differ as intended")
            finally:
                for server in servers.values():
                    await server.stop()
        finally:
            upstream.stop()
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", choices=("reserve", "plain"), help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--warmup-seconds", type=float, default=4)
    p.add_argument("--latency-seconds", type=float, default=4)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument(
        "--database-url",
        default=os.environ.get("APIFAST_BENCH_DATABASE_URL")
        or os.environ.get("APIFAST_TEST_DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres",
    )
    p.add_argument(
        "--nats-url",
        default=os.environ.get("APIFAST_BENCH_NATS_URL")
        or os.environ.get("APIFAST_TEST_NATS_URL")
        or "nats://127.0.0.1:4222",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args.serve)
    if nginx_binary() is None or wrk_binary() is None:
        print("SKIP reservations benchmark: nginx or wrk is not installed")
        return 0
    unreachable = asyncio.run(_reachable(args.database_url, args.nats_url))
    if unreachable:
        print(f"SKIP reservations benchmark: {unreachable}")
        return 0
    print(f"non-stream chat, {args.connections} connections, one key, {args.rounds} rounds:")
    results = asyncio.run(measure(args))
    with_holds = statistics.median(results["reserve"])
    without = statistics.median(results["plain"])
    ratio = with_holds / without
    cost = 1 - ratio
    print(f"with reservations:    {with_holds:>9,.0f} req/s (median)")
    print(f"without reservations: {without:>9,.0f} req/s (median)")
    added = results["reserve p50 ms"][0] - results["plain p50 ms"][0]
    print(f"added p50 latency at one connection: {added:+.3f} ms")
    verdict = "OK" if cost <= TARGET_COST else "OVER TARGET"
    print(
        f"ratio {ratio:.3f}: reservations cost {cost:.1%} of throughput "
        f"(target <= {TARGET_COST:.0%}) {verdict}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
