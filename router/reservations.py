"""The one Postgres round trip on the request path: authenticate the key and hold money."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from apifast.auth import gone_refusal
from apifast.db import Queries
from apifast.errors import ApiError
from apifast.money import format_usd

Q = Queries("apifast.router")

# Postgres unreachable (rather than a bug): refused, cut, shutting down, or gone.
DATABASE_DOWN = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.exceptions.OperatorInterventionError,
)


@dataclass(slots=True, frozen=True)
class Hold:
    key_id: int
    reserved: Decimal
    available: Decimal
    rpm_limit: int | None
    tpm_limit: int | None
    lease: str = ""  # the balance lease it was taken from (router/leases.py); "": its own row
    # A sub-key's hold: the parent whose balance it is held on (never leased). key_id is the
    # calling key (the child's own, for its rate limits).
    parent_id: int | None = None
    # A sub-key's parent's own rpm_limit (NULL: the default applies): the parent's window
    # counts its sub-keys' requests too. tpm_limit is already the parent's.
    parent_rpm_limit: int | None = None


class Refused(ApiError):
    """A hold refused for money (402, or 429 held up). `parent_id`: for a sub-key, the key
    whose balance it draws on (whose lease on this router can be given back first).
    `needed_usd`: the least the request needed held (of the client's `models`, the one
    refusal shown is the one that needed least)."""

    parent_id: int | None = None
    needed_usd: Decimal | None = None


class ModelNotAllowed(ApiError):
    """A sub-key's hold refused for the model it asked for (403): of the client's `models`,
    a later one may be allowed."""


class BalanceHeldUp(Refused):
    """The settled balance covers the request, but requests in flight hold it: worth a wait
    for them to settle (router/settle.py), and a 429 (not 402) if they do not in time."""

    def __init__(self, in_flight: Decimal, *, amount_shown: bool = True) -> None:
        held = f" (${format_usd(in_flight)})" if amount_shown else ""
        super().__init__(
            429,
            f"The balance is held by this key's requests in flight{held}; "
            "retry when they finish, after the seconds in Retry-After.",
            code="balance_in_flight",
            headers={"Retry-After": "1"},
        )


def rate_limited(wait_s: float) -> ApiError:
    return ApiError(
        429,
        "Rate limit reached for this key. Retry after the number of seconds in Retry-After.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(max(1, round(wait_s + 0.5)))},
    )


def database_unavailable() -> ApiError:
    # No hold, no service: a paid request is never served unbilled.
    return ApiError(
        503,
        "The billing database is unavailable; retry shortly.",
        code="database_unavailable",
        headers={"Retry-After": "5"},
    )


def key_refusal(status: str) -> ApiError | None:
    """The refusal of a hold's status that is about the key, not money or limits (unknown,
    disabled, a sub-key's expiry, allowed models, disabled parent); None for any other.
    Also what the free counting endpoints answer (router/token_count.py)."""
    if status == "unknown":
        return ApiError(401, "Invalid API key.", code="invalid_api_key")
    if status == "model_not_allowed":
        return ModelNotAllowed(403, "This sub-key is not allowed to use this model.",
                               code="model_not_allowed", param="model")  # fmt: skip
    return gone_refusal(status)


_CAPS = {"spend_cap": "total spend cap", "daily_cap": "daily spend cap"}


def _hold_or_refuse(row: Any, min_usd: Decimal) -> Hold:
    status = row["status"]
    if status == "ok":
        return Hold(
            key_id=row["key_id"],
            reserved=row["reserved_usd"],
            available=row["available_usd"],
            rpm_limit=row["rpm_limit"],
            tpm_limit=row["tpm_limit"],
            parent_id=row["parent_id"],
            parent_rpm_limit=row["parent_rpm_limit"],
        )
    refusal = key_refusal(status)
    if refusal is not None:
        raise refusal
    if status == "rate_limited":
        raise rate_limited(60 - time.time() % 60)  # the window is the database's minute
    available = row["available_usd"]
    in_flight = row["reserved_usd"]
    refused: Refused
    # A sub-key is never told its parent's balance, only what its own cap leaves.
    own = row["parent_id"] is None or status in _CAPS
    if in_flight > 0 and available + in_flight >= min_usd:
        refused = BalanceHeldUp(in_flight, amount_shown=own)
    elif status in _CAPS:
        # The parent may well have funds: it is this sub-key's own cap that is reached.
        refused = Refused(
            402,
            f"This sub-key reached its {_CAPS[status]}: this request needs at least "
            f"${format_usd(min_usd)}, the cap leaves ${format_usd(max(available, Decimal(0)))} "
            "(after requests in flight). Ask the key holder to raise it.",
            code="insufficient_balance",
        )
    elif not own:
        refused = Refused(
            402,
            "The balance this sub-key draws on is too low for this request; ask the key "
            "holder to top it up.",
            code="insufficient_balance",
        )
    else:
        refused = _insufficient(min_usd, available)
    # Only the parent's balance can be freed by giving back a lease on it, not a cap.
    refused.parent_id = row["parent_id"] if status == "insufficient" else None
    refused.needed_usd = min_usd
    raise refused


def _insufficient(min_usd: Decimal, available: Decimal) -> Refused:
    return Refused(
        402,
        f"Balance too low: this request needs at least ${format_usd(min_usd)} available, "
        f"the key has ${format_usd(max(available, Decimal(0)))} (after requests in flight). "
        "Top up with POST /v1/orders.",
        code="insufficient_balance",
    )


async def reserve(
    pool: asyncpg.Pool,
    key_hash: bytes,
    generation_id: str,
    min_usd: Decimal,
    max_usd: Decimal,
    ttl_s: int,
    default_rpm: int = 0,
    default_tpm: int = 0,
    model: str = "",
    count: bool = True,
) -> Hold:
    """Hold between `min_usd` and `max_usd` of the key's available balance and count the
    request toward the key's limits (those of its row, else the defaults), or refuse.
    `model` (the public id) is checked against a sub-key's allowed models. `count` False: a
    fallback model's hold, for a request its first hold counted already (no limits then)."""
    try:
        row = await pool.fetchrow(
            Q.reserve, key_hash, generation_id, min_usd, max_usd, ttl_s, default_rpm,
            default_tpm, model, count,
        )  # fmt: skip
    except DATABASE_DOWN:
        raise database_unavailable() from None
    assert row is not None
    return _hold_or_refuse(row, min_usd)


_Ask = tuple[bytes, str, Decimal, Decimal, str, bool, "asyncio.Future[Any]"]
_KEEP_IDLE_S = 1.0  # connections unused this long go back to the pool


class Reserver:
    """`reserve`, with the requests that arrive while a round trip is in flight sent together
    in the next one (group commit): one transaction and one commit for many holds. A lone
    request goes at once, so it waits no longer than with `reserve`; under load, the holds
    cost Postgres and this process far less CPU. The rules per request are the same."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        ttl_s: int,
        *,
        default_rpm: int = 0,
        default_tpm: int = 0,
        max_inflight: int = 2,
        max_batch: int = 256,
    ) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self.max_inflight = max_inflight
        self.max_batch = max_batch
        self._pending: list[_Ask] = []
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Connections kept between batches: the pool's acquire and release (with its session
        # reset, a second round trip) cost more than the hold itself. Given back when idle.
        self._kept: list[asyncpg.Connection] = []
        self._last_used = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    async def reserve(
        self,
        key_hash: bytes,
        generation_id: str,
        min_usd: Decimal,
        max_usd: Decimal,
        model: str = "",
        count: bool = True,
    ) -> Hold:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((key_hash, generation_id, min_usd, max_usd, model, count, future))
        if self._inflight < self.max_inflight:
            self._inflight += 1
            task = asyncio.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            row = await future
        except DATABASE_DOWN:
            raise database_unavailable() from None
        return _hold_or_refuse(row, min_usd)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                abandoned = []
                try:
                    conn = self._kept.pop() if self._kept else await self.pool.acquire()
                    try:
                        rows = await self._send(conn, batch)
                    except BaseException:
                        await self.pool.release(conn)  # the pool checks and resets it
                        raise
                    self._keep(conn)
                except Exception as exc:
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, generation_id, *_, future), row in zip(batch, rows, strict=True):
                    if not future.done():
                        future.set_result(row)
                    elif row["status"] == "ok":
                        abandoned.append(generation_id)  # its request was cancelled meanwhile
                for generation_id in abandoned:
                    await release(self.pool, generation_id)
        finally:
            self._inflight -= 1

    def _keep(self, conn: asyncpg.Connection) -> None:
        self._kept.append(conn)
        loop = asyncio.get_running_loop()
        self._last_used = loop.time()
        if self._idle_timer is None:
            self._idle_timer = loop.call_later(_KEEP_IDLE_S, self._release_idle)

    def _release_idle(self) -> None:
        loop = asyncio.get_running_loop()
        left = self._last_used + _KEEP_IDLE_S - loop.time()
        if left > 0 and self._kept:
            self._idle_timer = loop.call_later(left, self._release_idle)
            return
        self._idle_timer = None
        kept, self._kept = self._kept, []
        for conn in kept:
            task = asyncio.create_task(self.pool.release(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Give the kept connections back (the pool's close waits for them)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        kept, self._kept = self._kept, []
        for conn in kept:
            await self.pool.release(conn)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _send(self, conn: asyncpg.Connection, batch: list[_Ask]) -> list[Any]:
        args = (
            [a[0] for a in batch],
            [a[1] for a in batch],
            [a[2] for a in batch],
            [a[3] for a in batch],
            self.ttl_s,
            self.default_rpm,
            self.default_tpm,
            [a[4] for a in batch],
            [a[5] for a in batch],
        )
        for attempt in range(3):
            try:
                rows = await conn.fetch(Q.reserve_batch, *args)
                break
            except asyncpg.DeadlockDetectedError:
                # Only with a writer that locks several keys out of order; the batch was
                # rolled back whole, so sending it again is safe.
                if attempt == 2:
                    raise
        ordered = sorted(rows, key=lambda r: r["i"])
        assert len(ordered) == len(batch)
        return ordered


async def release(pool: asyncpg.Pool, generation_id: str) -> None:
    await pool.execute(Q.release_reservation, generation_id)
