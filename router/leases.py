"""Balance leases: a router holds a slice of a key's balance in Postgres and serves its
requests' holds from it in memory, with no round trip on the request path.

A lease is one row in `reservations` (id `lease:<router>:<key id>:<n>`), counted in the key's
`reserved_usd` like any hold, so no money is ever promised twice: the overspend bound stays
0. In memory the router keeps what it may still spend from the row (`amount`: the row less
the costs of the requests it finished) and what its requests in flight hold (`in_use`). A
request is served from the lease when `amount - in_use` covers its whole upper bound. The
meter takes each debited cost out of the lease's row (metering/sql/settle_usage_batch.sql),
so the row always covers the requests in flight and the costs not yet debited.

Growing runs off the request path, sized from the lease's recent use and capped at
`lease_share` of the key's available balance, so that several routers share a key. What is
unused goes back when the lease is idle, when its key changes (disabled, debited by hand:
NOTIFY on `apifast_keys`, and a poll every second), when the per-request path needs it, and
at shutdown. A dead router's lease is released by the meter's sweep at its TTL. A key whose
balance is small gets no lease: each of its requests takes its own exact hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from apifast.db import Queries
from apifast.metrics import Metrics
from apifast.router.reservations import Hold

Q = Queries("apifast.router")
log = logging.getLogger("apifast.router")

CHANNEL = "apifast_keys"  # NOTIFY'd with the key id when a key is disabled, debited by hand...
ZERO = Decimal(0)
# A lease covers at least this many of the largest request bound it has seen; a key whose
# available balance (times lease_share) is below that gets no lease.
LEASE_REQUESTS = 16
TICK_S = 1.0  # the housekeeping period: growth, idle give-back, key state, renewal
# A lease holds about this many ticks of its recent use (peak in flight plus spend).
HORIZON_TICKS = 2


@dataclass(slots=True, eq=False)
class Lease:
    lease_id: str
    key_hash: bytes
    key_id: int
    rpm_limit: int | None
    tpm_limit: int | None
    amount: Decimal  # what this router may still spend from the row (the row holds >= this)
    bound: Decimal  # the largest request bound seen
    target: Decimal  # what the lease should hold
    valid_until: float  # monotonic; after it the row may have expired: not served from
    in_use: Decimal = ZERO  # the bounds of the requests in flight
    peak: Decimal = ZERO  # the most in use at once since the last tick
    spent: Decimal = ZERO  # the costs finished since the last tick
    last_used: float = 0.0
    growing: bool = False
    retired: bool = False  # serves nothing more; its row goes once its requests are done

    @property
    def free(self) -> Decimal:
        return self.amount - self.in_use


class LeaseBook:
    """This router's leases. `take` and `finish` are the request path (memory only); the
    rest runs in tasks it owns, started by `start` and stopped by `close`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        share: Decimal,
        ttl_s: int,
        idle_s: float,
        hold_ttl_s: int,
        database_url: str = "",
        default_limits: bool = False,
        min_rps: int = 200,
        metrics: Metrics | None = None,
    ) -> None:
        self.pool = pool
        self.share = share
        self.ttl_s = ttl_s
        self.idle_s = idle_s
        self.hold_ttl_s = hold_ttl_s
        self.database_url = database_url
        # Rate limits are counted in Postgres per request (router/migrations/postgres/
        # 0009_global_rate_limits.sql), so that they hold across routers: a key with a
        # limit is held per request, never from a lease.
        self.default_limits = default_limits
        # A key gets a lease once this many of its requests were held in Postgres within one
        # tick: one seldom used gains little and would only see its balance held longer.
        self.min_rps = min_rps
        self.metrics = metrics
        if metrics is not None:
            metrics.watch(metrics.leases, lambda: len(self._all))
        self.router_id = secrets.token_hex(6)
        # Renewed with half the TTL left; never served from within `margin` of expiry.
        self._margin = max(2.0, ttl_s / 10)
        self._live: dict[bytes, Lease] = {}  # key hash -> the lease requests are served from
        self._all: dict[str, Lease] = {}  # lease id -> live and retired leases with a row
        self._opening: set[bytes] = set()
        self._busy: dict[bytes, int] = {}  # key hash -> holds in Postgres since the last tick
        self._serial = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None

    # --- the request path -----------------------------------------------------------------

    def take(self, key_hash: bytes, bound: Decimal) -> Hold | None:
        """A hold of `bound` from this key's lease, or None (then hold in Postgres)."""
        lease = self._live.get(key_hash)
        if lease is None:
            return None
        now = time.monotonic()
        if bound > lease.bound:
            lease.bound = bound
        free = lease.amount - lease.in_use
        if free < bound or now >= lease.valid_until:
            self._grow(lease)
            return None
        lease.in_use += bound
        if lease.in_use > lease.peak:
            lease.peak = lease.in_use
        lease.last_used = now
        if free - bound < lease.target / 2:
            self._grow(lease)
        return Hold(
            key_id=lease.key_id,
            reserved=bound,
            available=free,
            rpm_limit=lease.rpm_limit,
            tpm_limit=lease.tpm_limit,
            lease=lease.lease_id,
        )

    def finish(self, lease_id: str, bound: Decimal, cost: Decimal) -> None:
        """A request served from the lease ended and cost `cost` (0 for one given back)."""
        lease = self._all.get(lease_id)
        if lease is None:
            return
        lease.in_use -= bound
        lease.amount -= cost
        lease.spent += cost
        if lease.retired:
            self._wake.set()

    def consider(self, key_hash: bytes, held: Hold, bound: Decimal) -> None:
        """After a hold in Postgres: open a lease for the key if it is busy (`min_rps` holds
        within a tick) and its balance is large enough."""
        if key_hash in self._live or key_hash in self._opening or self.share <= 0:
            return
        if held.parent_id is not None:
            # A sub-key is held per request, exactly: its caps are checked by each hold
            # (and it has no balance of its own to lease; lease_grow.sql refuses it too).
            return
        if held.rpm_limit or held.tpm_limit or self.default_limits:
            return
        seen = self._busy.get(key_hash, 0) + 1
        if seen < self.min_rps:
            self._busy[key_hash] = seen
            return
        want = bound * LEASE_REQUESTS
        if (held.available - held.reserved) * self.share < want:
            return  # a small balance: exact holds spend its last cents exactly
        self._opening.add(key_hash)
        self._spawn(self._open(key_hash, held.key_id, bound, want))

    async def surrender(self, key_hash: bytes) -> bool:
        """Give back the unused part of this key's lease now (the per-request path needs the
        money it holds). True if anything went back."""
        lease = self._live.get(key_hash)
        if lease is None:
            return False
        self._retire(lease)
        free = lease.free
        if free <= 0:
            return False
        return await self._give_back([(lease, free)])

    async def surrender_key(self, key_id: int) -> bool:
        """`surrender` by key id: a sub-key's request refused for its parent's balance,
        which this router's lease on the parent may be holding."""
        for key_hash, lease in list(self._live.items()):
            if lease.key_id == key_id:
                return await self.surrender(key_hash)
        return False

    def revoke(self, key_id: int) -> None:
        """The key changed (disabled, debited by hand, limits): serve nothing more from its
        lease; what the lease does not need goes back at once."""
        for lease in list(self._live.values()):
            if lease.key_id == key_id:
                self._retire(lease)

    # --- off the request path -------------------------------------------------------------

    async def start(self) -> None:
        await self._listen()
        self._runner = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Give back all that is unused. The rest (costs the meter has not yet debited) stays
        held as long as a request's own hold would."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for lease in list(self._live.values()):
            self._retire(lease)
        try:
            await self._give_back([(lease, lease.free) for lease in self._all.values()])
            await self._drop_empty()
            if self._all:
                await self._renew(list(self._all.values()), self.hold_ttl_s)
        except Exception as exc:  # the meter's sweep releases them at their TTL
            log.warning("leases: giving back at shutdown failed: %s", type(exc).__name__)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()

    def _spawn(self, step: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(step)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.lease_growths.labels(result).inc()

    def _retire(self, lease: Lease) -> None:
        lease.retired = True
        if self._live.get(lease.key_hash) is lease:
            del self._live[lease.key_hash]
        self._wake.set()

    async def _open(self, key_hash: bytes, key_id: int, bound: Decimal, want: Decimal) -> None:
        lease_id = f"lease:{self.router_id}:{key_id}:{next(self._serial)}"
        try:
            started = time.monotonic()
            row = await self.pool.fetchrow(
                Q.lease_grow, key_hash, lease_id, want, self.share, want, self.ttl_s, True
            )
            self._count("opened" if row is not None and row["granted"] > 0 else "refused")
            if row is None or row["disabled"] or row["granted"] <= 0:
                return
            if row["rpm_limit"] or row["tpm_limit"]:  # limited meanwhile: give it back
                await self._give_back_row(lease_id, row["granted"])
                return
            lease = Lease(
                lease_id=lease_id,
                key_hash=key_hash,
                key_id=row["key_id"],
                rpm_limit=row["rpm_limit"],
                tpm_limit=row["tpm_limit"],
                amount=row["granted"],
                bound=bound,
                target=want,
                valid_until=started + self.ttl_s - self._margin,
                last_used=time.monotonic(),
            )
            self._all[lease_id] = lease
            self._live[key_hash] = lease
        except Exception as exc:  # requests keep taking their own holds
            log.warning("leases: opening one failed: %s", type(exc).__name__)
        finally:
            self._opening.discard(key_hash)

    def _grow(self, lease: Lease) -> None:
        if not lease.growing and not lease.retired:
            lease.growing = True
            self._spawn(self._grow_now(lease))

    async def _grow_now(self, lease: Lease) -> None:
        try:
            target = max(lease.target, lease.bound * LEASE_REQUESTS)
            want = target - lease.free
            if want < lease.bound:
                return
            started = time.monotonic()
            row = await self.pool.fetchrow(
                Q.lease_grow, lease.key_hash, lease.lease_id, want, self.share, lease.bound,
                self.ttl_s, False,
            )  # fmt: skip
            if row is not None and not row["existed"]:
                log.warning("leases: a lease expired before its renewal")
                self._retire(lease)
                self._all.pop(lease.lease_id, None)
                return
            if row is None or row["disabled"] or row["rpm_limit"] or row["tpm_limit"]:
                self._retire(lease)
                return
            self._count("grown" if row["granted"] > 0 else "refused")
            if row["granted"] > 0:
                lease.amount += row["granted"]
                lease.valid_until = started + self.ttl_s - self._margin
            lease.rpm_limit, lease.tpm_limit = row["rpm_limit"], row["tpm_limit"]
        except Exception as exc:
            log.warning("leases: growing one failed: %s", type(exc).__name__)
        finally:
            lease.growing = False

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            self._wake.clear()
            try:
                if self._listener is None or self._listener.is_closed():
                    await self._listen()
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leases: housekeeping failed: %s", type(exc).__name__)

    async def _tick(self) -> None:
        self._busy.clear()
        if not self._all:
            return
        now = time.monotonic()
        await self._check_keys()
        giving: list[tuple[Lease, Decimal]] = []
        for lease in list(self._all.values()):
            if lease.retired:
                if lease.free > 0:
                    giving.append((lease, lease.free))
                continue
            # Size from the last second's use; trim what that leaves far unused.
            use = (lease.peak + lease.spent) * HORIZON_TICKS
            lease.target = max(lease.bound * LEASE_REQUESTS, use)
            lease.peak, lease.spent = lease.in_use, ZERO
            if now - lease.last_used > self.idle_s:
                self._retire(lease)
                giving.append((lease, lease.free))
            elif lease.free > 2 * lease.target:
                giving.append((lease, lease.free - lease.target))
            elif lease.free < lease.target / 2:
                self._grow(lease)
        if giving:
            await self._give_back(giving)
        await self._drop_empty()
        due = [lease for lease in self._all.values() if lease.valid_until - now < self.ttl_s / 2]
        if due:
            await self._renew(due, self.ttl_s)

    async def _check_keys(self) -> None:
        """Retire the leases whose key was disabled or overdrawn (a manual debit), and
        forget those whose row is gone (it expired: this router was stalled or cut off)."""
        asked = list(self._all.items())  # a lease opened during the query is not judged
        rows = await self.pool.fetch(Q.lease_state, [lease_id for lease_id, _ in asked])
        found = {r["generation_id"]: r for r in rows}
        for lease_id, lease in asked:
            row = found.get(lease_id)
            if row is None:
                if not lease.retired:
                    log.warning("leases: a lease expired before its renewal")
                self._retire(lease)
                self._all.pop(lease_id, None)
                continue
            limited = row["rpm_limit"] or row["tpm_limit"]
            if row["disabled"] or row["available"] < 0 or limited:
                self._retire(lease)

    async def _give_back(self, leases: list[tuple[Lease, Decimal]]) -> bool:
        giving = [(lease, amount) for lease, amount in leases if amount > 0]
        if not giving:
            return False
        ids = [lease.lease_id for lease, _ in giving]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(Q.lease_lock_keys, ids)
            await conn.execute(Q.lease_shrink, ids, [amount for _, amount in giving])
        for lease, amount in giving:
            lease.amount -= amount
        return True

    async def _give_back_row(self, lease_id: str, amount: Decimal) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(Q.lease_lock_keys, [lease_id])
            await conn.execute(Q.lease_shrink, [lease_id], [amount])
            await conn.execute(Q.lease_drop_empty, [lease_id])

    async def _drop_empty(self) -> None:
        done = [i for i, lease in self._all.items() if lease.retired and lease.in_use <= 0]
        if not done:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(Q.lease_lock_keys, done)
            await conn.execute(Q.lease_drop_empty, done)
            left = {r["generation_id"] for r in await conn.fetch(Q.lease_state, done)}
        for lease_id in done:
            if lease_id not in left:  # dropped; one still holding undebited costs stays
                self._all.pop(lease_id, None)

    async def _renew(self, leases: list[Lease], ttl_s: int) -> None:
        ids = [lease.lease_id for lease in leases]
        started = time.monotonic()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(Q.lease_lock_keys, ids)
            renewed = {r["generation_id"] for r in await conn.fetch(Q.lease_renew, ids, ttl_s)}
        for lease in leases:
            if lease.lease_id in renewed:
                lease.valid_until = started + ttl_s - self._margin

    async def _listen(self) -> None:
        if not self.database_url:
            return
        try:
            conn = await asyncpg.connect(self.database_url)
            await conn.add_listener(CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("leases: cannot LISTEN (%s); polling only", type(exc).__name__)
            return
        self._listener = conn

    def _notified(self, _conn: object, _pid: object, _channel: object, payload: object) -> None:
        with contextlib.suppress(ValueError, TypeError):
            self.revoke(int(str(payload)))
