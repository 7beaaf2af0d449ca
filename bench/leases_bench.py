"""What can one Postgres primary carry of balance leases? The statements a router's
`LeaseBook` (router/leases.py) runs, against a fresh database, from `--routers` concurrent
connections (each one router's lease task, with its own lease on every key):

- grow: `lease_grow.sql`, what opening or growing a lease costs (a key's row lock, an
  UPSERT of the lease row and an UPDATE of the key), over `--keys` keys and on one key
  (every router growing its lease on the same busy key: the row lock is the ceiling);
- give back: `lease_lock_keys.sql` + `lease_shrink.sql` in one transaction, one lease;
- renew: a router's whole tick of renewals, its `--keys` leases in one transaction;
- and, for reference on the same machine in the same run, the per-request hold a key
  without a lease takes (`reserve.sql`), over the keys and on one key.

    python bench/leases_bench.py [--rounds 3] [--seconds 5] [--routers 8] [--keys 64]

A busy key costs a primary about one growth per router every second or two (docs/billing.md,
"Balance leases"), a give-back when it idles and a renewal per half TTL, batched per router:
so the growths per second are about the busy (key, router) pairs one primary can keep leased.
Each scenario runs `--seconds` per round and every figure is the median of the rounds.
Needs only PostgreSQL (`APIFAST_BENCH_DATABASE_URL`, else `APIFAST_TEST_DATABASE_URL`, else
postgresql://postgres@127.0.0.1:5432/postgres; an admin DSN: the bench creates and drops its
own database). Skips (exit 0) with a message when Postgres is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python bench/leases_bench.py`: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from apifast.db import Queries, create_pool
from apifast.key_admin import create_key
from apifast.server.migrations import migrate_database

Q = Queries("apifast.router")
CREDIT = Decimal("1000000.00")
SHARE = Decimal("0.25")  # APIFAST_LEASE_SHARE's default
STEP = Decimal("0.01")  # what each growth asks for and each give-back returns
LEASED = Decimal("100.00")  # what each lease holds at the start of a run
HOLD = Decimal("0.001")  # a request's upper bound, for the reference holds
TTL_S = 60  # APIFAST_LEASE_TTL_S's default

# (name, label) in the order printed.
SCENARIOS = (
    ("grow_keys", "grow a lease, {keys} keys"),
    ("grow_one", "grow a lease, one key"),
    ("give_back", "give back, {keys} keys"),
    ("renew", "renew a router's {keys} leases"),
    ("hold_keys", "hold per request, {keys} keys"),
    ("hold_one", "hold per request, one key"),
)


class Bench:
    def __init__(self, pool: asyncpg.Pool, key_hashes: list[bytes], routers: int) -> None:
        self.pool = pool
        self.keys = key_hashes
        self.routers = routers
        self.leases = [[f"lease:bench{r}:{k}:1" for k in range(len(key_hashes))]
                       for r in range(routers)]  # fmt: skip
        self._serial = itertools.count()

    async def open_leases(self) -> None:
        for r in range(self.routers):
            for key_hash, lease_id in zip(self.keys, self.leases[r], strict=True):
                row = await self.pool.fetchrow(
                    Q.lease_grow, key_hash, lease_id, STEP, SHARE, STEP, TTL_S, True
                )
                assert row is not None and row["granted"] > 0, "a lease was not granted"

    # One operation of each scenario, for router `r` at its `i`-th step.

    async def grow_keys(self, conn: asyncpg.Connection, r: int, i: int) -> None:
        k = i % len(self.keys)
        await self._grow(conn, self.keys[k], self.leases[r][k])

    async def grow_one(self, conn: asyncpg.Connection, r: int, i: int) -> None:
        await self._grow(conn, self.keys[0], self.leases[r][0])

    async def _grow(self, conn: asyncpg.Connection, key_hash: bytes, lease_id: str) -> None:
        row = await conn.fetchrow(Q.lease_grow, key_hash, lease_id, STEP, SHARE, STEP, TTL_S,
                                  False)  # fmt: skip
        if row is None or row["granted"] <= 0:
            raise RuntimeError("a growth was refused: the keys ran dry")

    async def give_back(self, conn: asyncpg.Connection, r: int, i: int) -> None:
        lease_id = self.leases[r][i % len(self.keys)]
        async with conn.transaction():
            await conn.execute(Q.lease_lock_keys, [lease_id])
            await conn.execute(Q.lease_shrink, [lease_id], [STEP])

    async def renew(self, conn: asyncpg.Connection, r: int, i: int) -> None:
        ids = self.leases[r]
        async with conn.transaction():
            await conn.execute(Q.lease_lock_keys, ids)
            renewed = await conn.fetch(Q.lease_renew, ids, TTL_S)
        if len(renewed) != len(ids):
            raise RuntimeError("a lease was gone at its renewal")

    async def hold_keys(self, conn: asyncpg.Connection, r: int, i: int) -> None:
        await self._hold(conn, self.keys[(i * self.routers + r) % len(self.keys)])

    async def hold_one(self, conn: asyncpg.Connection, r: int, i: int) -> None:
        await self._hold(conn, self.keys[0])

    async def _hold(self, conn: asyncpg.Connection, key_hash: bytes) -> None:
        gid = f"gen-bench-{next(self._serial)}"
        row = await conn.fetchrow(Q.reserve, key_hash, gid, HOLD, HOLD, TTL_S, 0, 0, "", True)
        if row is None or row["status"] != "ok":
            raise RuntimeError(f"a hold was refused: {row and row['status']}")

    async def reset(self) -> None:
        """Between runs: the reference holds go (no meter settles them here) and every lease
        holds LEASED again (so a give-back always returns something), so each run starts
        from the same rows."""
        async with self.pool.acquire() as conn:
            await conn.execute("DELETE FROM reservations WHERE generation_id LIKE 'gen-bench-%'")
            await conn.execute(
                "UPDATE reservations SET amount_usd = $1 WHERE generation_id LIKE 'lease:%'", LEASED
            )
            await conn.execute(
                "UPDATE api_keys a SET reserved_usd = coalesce((SELECT sum(amount_usd) "
                "FROM reservations r WHERE r.key_id = a.id), 0)"
            )
            await conn.execute("VACUUM ANALYZE api_keys, reservations")


Step = Callable[[asyncpg.Connection, int, int], Awaitable[None]]


async def run_scenario(bench: Bench, step: Step, seconds: float) -> tuple[float, float, float]:
    """Operations per second over all routers, and the p50 and p99 of one, in ms."""
    await bench.reset()
    stop = time.perf_counter() + seconds
    latencies: list[list[float]] = [[] for _ in range(bench.routers)]

    async def router(r: int) -> None:
        async with bench.pool.acquire() as conn:
            own = latencies[r]
            i = 0
            while (started := time.perf_counter()) < stop:
                await step(conn, r, i)
                own.append(time.perf_counter() - started)
                i += 1

    began = time.perf_counter()
    await asyncio.gather(*(router(r) for r in range(bench.routers)))
    elapsed = time.perf_counter() - began
    every = sorted(itertools.chain.from_iterable(latencies))
    if not every:
        raise RuntimeError("no operation finished: raise --seconds")
    p50 = every[len(every) // 2] * 1000
    p99 = every[min(len(every) - 1, int(len(every) * 0.99))] * 1000
    return len(every) / elapsed, p50, p99


async def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    database = f"apifast_bench_leases_{os.getpid()}_{secrets.token_hex(3)}"
    base, _, _ = args.database_url.rpartition("/")
    dsn = f"{base}/{database}"
    admin = await asyncpg.connect(args.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
        try:
            await migrate_database(dsn)
            secret = secrets.token_bytes(32)
            for _ in range(args.keys):
                await create_key(dsn, secret, CREDIT)
            pool = await create_pool(dsn, min_size=args.routers + 1, max_size=args.routers + 1)
            try:
                hashes = [r["key_hash"] for r in
                          await pool.fetch("SELECT key_hash FROM api_keys ORDER BY id")]  # fmt: skip
                bench = Bench(pool, hashes, args.routers)
                await bench.open_leases()
                runs: dict[str, list[tuple[float, float, float]]] = {n: [] for n, _ in SCENARIOS}
                for round_no in range(1, args.rounds + 1):
                    line = []
                    for name, _ in SCENARIOS:
                        result = await run_scenario(bench, getattr(bench, name), args.seconds)
                        runs[name].append(result)
                        line.append(f"{name} {result[0]:,.0f}/s")
                    print(f"  round {round_no}: " + "  ".join(line), flush=True)
            finally:
                await pool.close()
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()
    return {
        name: {
            "ops_per_s": statistics.median(r[0] for r in results),
            "p50_ms": statistics.median(r[1] for r in results),
            "p99_ms": statistics.median(r[2] for r in results),
        }
        for name, results in runs.items()
    }


async def _reachable(dsn: str) -> str:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL at {dsn} is unreachable ({type(exc).__name__})"
    await conn.close()
    return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--routers", type=int, default=8, help="concurrent connections")
    p.add_argument("--keys", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the medians as JSON")
    p.add_argument(
        "--database-url",
        default=os.environ.get("APIFAST_BENCH_DATABASE_URL")
        or os.environ.get("APIFAST_TEST_DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.routers < 1 or args.keys < 1 or args.rounds < 1:
        print("leases benchmark: --routers, --keys and --rounds must be at least 1")
        return 2
    unreachable = asyncio.run(_reachable(args.database_url))
    if unreachable:
        print(f"SKIP leases benchmark: {unreachable}")
        return 0
    load_before = os.getloadavg()[0]
    print(f"lease statements on one Postgres: {args.routers} routers (connections), "
          f"{args.keys} keys, {args.rounds} rounds of {args.seconds:g} s")  # fmt: skip
    results = asyncio.run(measure(args))
    load_after = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    width = 34
    print(f"{'':<{width}}  {'ops/s':>9}  {'p50 ms':>7}  {'p99 ms':>7}")
    print(f"{'-' * width}  {'-' * 9}  {'-' * 7}  {'-' * 7}")
    for name, label in SCENARIOS:
        r = results[name]
        print(f"{label.format(keys=args.keys):<{width}}  {r['ops_per_s']:>9,.0f}  "
              f"{r['p50_ms']:>7.3f}  {r['p99_ms']:>7.3f}")  # fmt: skip
    print(f"{'-' * width}  {'-' * 9}  {'-' * 7}  {'-' * 7}")
    print(f"(medians of {args.rounds} rounds; each op is one statement or transaction)")
    renewed = results["renew"]["ops_per_s"] * args.keys
    print(f"renewals: {renewed:,.0f} leases/s in batches of {args.keys}")
    grow = results["grow_keys"]["ops_per_s"]
    print(f"at one growth per busy (key, router) pair a second: ~{grow:,.0f} pairs per primary; "
          f"one busy key across routers: ~{results['grow_one']['ops_per_s']:,.0f} growths/s")  # fmt: skip
    print(f"1-min load average {load_before:.1f} before, {load_after:.1f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
