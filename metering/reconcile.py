"""The ledger reconciler: compare the Postgres ledger with ClickHouse, per key, over a range,
and repair what can be repaired. `apifast reconcile` (`apifast.cli.reconcile`) runs it.

The ledger is the money; ClickHouse is the analytics copy. Both are written by the meter,
each exactly once per generation id, so they must agree id for id. Differences are found by
id, not by time: a request near the edge of the range is looked up on the other side
wherever it falls.

    missing in ClickHouse   debited, but no usage row       --repair: the event is re-read
                                                            from the stream (or, when the
                                                            stream no longer has it, rebuilt
                                                            from the ledger and flagged)
    missing in the ledger   a usage row, never debited      --repair: debited, exactly once
    amount mismatch         the two disagree on the cost    flagged only: money is never
                                                            changed by a guess
    duplicated in ClickHouse  more than one row for an id   --repair: OPTIMIZE ... FINAL
                                                            (the rollups it was counted twice
                                                            in are then rebuilt, below)
    rollup short            a dashboard rollup group sums   --repair: the difference is added
                            less than its raw events        (the meter's own repair, rollups.py)
    rollup above            it sums more (a duplicate       --repair: the group is rebuilt from
                            collapsed since)                the raw events

The rollups are checked group by group (every whole hour and day the range touches) against
`usage_events FINAL`, which is checked id by id against the ledger: when both agree,
`/v1/usage` and the admin overview add up to the ledger. The rollups are repaired after the
rows, so that rows restored by the repair are counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from apifast.metering.event import event_from_ledger_row
from apifast.metering.rollups import RollupDifference, Scope
from apifast.settings import Settings

if TYPE_CHECKING:
    import asyncpg

    from apifast.metering.clickhouse import ClickHouseStore

_CHUNK = 5000  # ids per lookup query
# Events are published when a request ends and debited soon after; a stream read for repair
# starts this long before the earliest debit it looks for.
_STREAM_LOOKBACK = timedelta(hours=2)


@dataclass
class KeyTotals:
    key_hash: str
    prefix: str
    ledger_events: int = 0
    ledger_usd: Decimal = Decimal(0)
    clickhouse_events: int = 0
    clickhouse_usd: Decimal = Decimal(0)


@dataclass
class Mismatch:
    generation_id: str
    ledger_usd: Decimal
    clickhouse_usd: Decimal


@dataclass
class Report:
    start: datetime
    end: datetime
    keys: list[KeyTotals] = field(default_factory=list)
    missing_in_clickhouse: list[str] = field(default_factory=list)
    missing_in_ledger: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    duplicated_in_clickhouse: list[str] = field(default_factory=list)
    # Dashboard rollup groups that disagree with the raw events (rollups.py).
    rollup_differences: list[RollupDifference] = field(default_factory=list)
    repaired: dict[str, int] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.missing_in_clickhouse
            or self.missing_in_ledger
            or self.mismatched
            or self.duplicated_in_clickhouse
            or self.rollup_differences
        )

    def to_json(self) -> str:
        data = asdict(self)
        for diff, out in zip(self.rollup_differences, data["rollup_differences"], strict=True):
            out["short"] = diff.short
        data["clean"] = self.clean
        return json.dumps(data, default=str, indent=2)

    def to_text(self) -> str:
        lines = [f"reconcile {self.start.isoformat()} .. {self.end.isoformat()}"]
        lines.append(
            f"{'key':<16} {'ledger n':>9} {'ledger usd':>18} {'clickhouse n':>12} "
            f"{'clickhouse usd':>18}  diff"
        )
        for k in self.keys:
            diff = k.ledger_usd - k.clickhouse_usd
            lines.append(
                f"{k.prefix or k.key_hash[:12]:<16} {k.ledger_events:>9} {k.ledger_usd:>18} "
                f"{k.clickhouse_events:>12} {k.clickhouse_usd:>18}  {diff if diff else ''}"
            )
        for title, ids in (
            ("missing in ClickHouse", self.missing_in_clickhouse),
            ("missing in the ledger", self.missing_in_ledger),
            ("duplicated in ClickHouse", self.duplicated_in_clickhouse),
        ):
            if ids:
                lines.append(f"{title}: {len(ids)}: {', '.join(ids[:20])}")
        for m in self.mismatched[:20]:
            lines.append(
                f"amount mismatch {m.generation_id}: ledger {m.ledger_usd} "
                f"clickhouse {m.clickhouse_usd}"
            )
        if self.rollup_differences:
            lines.append(f"rollup groups that disagree with the raw events: "
                         f"{len(self.rollup_differences)}")  # fmt: skip
        lines.extend(_rollup_line(d) for d in self.rollup_differences[:20])
        for name, count in self.repaired.items():
            lines.append(f"repaired {name}: {count}")
        lines.extend(f"flagged: {note}" for note in self.flagged)
        lines.append("OK: the ledger and ClickHouse agree" if self.clean else "DIFFERENCES FOUND")
        return "\n".join(lines)


def _rollup_line(d: RollupDifference) -> str:
    group = " ".join(f"{k}={v[:12] if k == 'key_hash' else v}" for k, v in d.group.items())
    sides = ", ".join(
        f"{c} rollup {d.rollup[c]} raw {d.raw[c]}" for c in d.raw if d.raw[c] != d.rollup[c]
    )
    return f"rollup {'short' if d.short else 'above'} {d.table} {group}: {sides}"


@dataclass
class _Sides:
    ledger: dict[str, dict[str, Any]]  # generation id -> ledger row (in range)
    clickhouse: dict[str, dict[str, Any]]  # generation id -> ClickHouse summary (in range)
    ledger_any: dict[str, dict[str, Any]]  # ... plus those found outside the range
    clickhouse_any: dict[str, dict[str, Any]]


def _text(value: Any) -> str:
    """ClickHouse FixedString columns come back as bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _chunks(items: Sequence[str]) -> Iterable[list[str]]:
    for i in range(0, len(items), _CHUNK):
        yield list(items[i : i + _CHUNK])


async def _read_sides(
    pool: asyncpg.Pool, store: ClickHouseStore, start: datetime, end: datetime
) -> _Sides:
    from apifast.db import Queries

    q = Queries("apifast.metering")
    ledger = {
        r["generation_id"]: dict(r) for r in await pool.fetch(q.reconcile_ledger_range, start, end)
    }
    rows = await store.query(q.reconcile_ch_range, {"start": start, "end": end})
    clickhouse = {r["generation_id"]: r for r in rows}
    ledger_any, clickhouse_any = dict(ledger), dict(clickhouse)
    # Requests near the edges: debited in range but requested before it, or the reverse.
    for ids in _chunks([i for i in ledger if i not in clickhouse]):
        for r in await store.query(q.reconcile_ch_by_ids, {"ids": ids}):
            clickhouse_any[r["generation_id"]] = r
    for ids in _chunks([i for i in clickhouse if i not in ledger]):
        for r in await pool.fetch(q.reconcile_ledger_by_ids, ids):
            ledger_any[r["generation_id"]] = dict(r)
    return _Sides(ledger, clickhouse, ledger_any, clickhouse_any)


async def _compare(
    pool: asyncpg.Pool, store: ClickHouseStore, start: datetime, end: datetime
) -> tuple[Report, _Sides]:
    from apifast.db import Queries

    sides = await _read_sides(pool, store, start, end)
    report = Report(start=start, end=end)
    report.missing_in_clickhouse = sorted(i for i in sides.ledger if i not in sides.clickhouse_any)
    report.missing_in_ledger = sorted(i for i in sides.clickhouse if i not in sides.ledger_any)
    both = (
        (set(sides.ledger) | set(sides.clickhouse))
        & set(sides.ledger_any)
        & set(sides.clickhouse_any)
    )
    for gid in sorted(both):
        ledger_cost = Decimal(sides.ledger_any[gid]["cost_usd"])
        ch = sides.clickhouse_any[gid]
        if ledger_cost != Decimal(ch["min_cost"]) or ch["min_cost"] != ch["max_cost"]:
            report.mismatched.append(Mismatch(gid, ledger_cost, Decimal(ch["max_cost"])))
    report.duplicated_in_clickhouse = sorted(
        gid for gid, ch in sides.clickhouse_any.items() if int(ch["copies"]) > 1
    )

    totals: dict[str, KeyTotals] = {}
    prefixes: dict[str, str] = {}
    for row in sides.ledger.values():
        key_hex = bytes(row["key_hash"]).hex()
        prefixes[key_hex] = row["prefix"]
        t = totals.setdefault(key_hex, KeyTotals(key_hex, row["prefix"]))
        t.ledger_events += 1
        t.ledger_usd += Decimal(row["cost_usd"])
    for row in sides.clickhouse.values():
        key_hex = _text(row["key"])
        t = totals.setdefault(key_hex, KeyTotals(key_hex, prefixes.get(key_hex, "")))
        t.clickhouse_events += 1
        t.clickhouse_usd += Decimal(row["max_cost"])
    unnamed = [bytes.fromhex(h) for h, t in totals.items() if not t.prefix]
    if unnamed:
        for r in await pool.fetch(Queries("apifast.metering").reconcile_key_prefixes, unnamed):
            totals[bytes(r["key_hash"]).hex()].prefix = r["prefix"]
    report.keys = sorted(totals.values(), key=lambda t: (t.prefix, t.key_hash))
    report.rollup_differences = await store.rollup_differences(Scope.between(start, end))
    return report, sides


def _rank(event: dict[str, Any] | None) -> float:
    if event is None:
        return -1
    return event.get("checkpoint") or float("inf")


async def _events_from_stream(
    settings: Settings, wanted: set[str], since: datetime
) -> dict[str, dict[str, Any]]:
    """The published events among `wanted`, read from the stream (it keeps a week)."""
    import nats
    import orjson
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    found: dict[str, dict[str, Any]] = {}
    from apifast.metering.stream import nats_servers

    nc = await nats.connect(
        nats_servers(settings.nats_url), connect_timeout=5, max_reconnect_attempts=2
    )
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            settings.nats_subject,
            durable=None,
            stream=settings.nats_stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=since,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=60,
            ),
        )
        while len(found) < len(wanted):
            try:
                msgs = await sub.fetch(1000, timeout=2)
            except TimeoutError:
                break
            for msg in msgs:
                event = orjson.loads(msg.data)
                gid = event.get("generation_id")
                # A request's final event wins over its checkpoints, a later checkpoint
                # over an earlier one (a stream billed at its checkpoint has no final).
                if gid in wanted and _rank(event) >= _rank(found.get(gid)):
                    found[gid] = event
            if not msgs or msgs[-1].metadata.num_pending == 0:
                break
        await sub.unsubscribe()
    finally:
        await nc.close()
    return found


async def _repair(
    settings: Settings, pool: asyncpg.Pool, store: ClickHouseStore, report: Report, sides: _Sides
) -> None:
    from apifast.metering.ledger import debit_batch

    if report.missing_in_clickhouse:
        wanted = set(report.missing_in_clickhouse)
        events: dict[str, dict[str, Any]] = {}
        if settings.nats_url:
            since = min(sides.ledger[i]["created_at"] for i in wanted) - _STREAM_LOOKBACK
            try:
                events = await _events_from_stream(settings, wanted, since)
            except Exception as exc:  # the stream is optional for a repair
                report.flagged.append(f"the stream could not be read ({type(exc).__name__})")
        rebuilt = [event_from_ledger_row(sides.ledger[i]) for i in sorted(wanted - events.keys())]
        await store.insert_new_events([*events.values(), *rebuilt])
        report.repaired["clickhouse rows from the stream"] = len(events)
        if rebuilt:
            report.repaired["clickhouse rows rebuilt from the ledger"] = len(rebuilt)
            report.flagged.append(
                f"{len(rebuilt)} ClickHouse rows rebuilt from the ledger (cost exact, "
                f"tokens and model unknown): {', '.join(r['generation_id'] for r in rebuilt[:20])}"
            )
    if report.missing_in_ledger:
        events_ch = [
            {
                "generation_id": gid,
                "key_hash": _text(sides.clickhouse[gid]["key"]),
                "cost_usd": str(sides.clickhouse[gid]["max_cost"]),
            }
            for gid in report.missing_in_ledger
        ]
        counted = await debit_batch(pool, events_ch)
        report.repaired["ledger debits"] = len(counted)
        if len(counted) < len(events_ch):
            report.flagged.append(
                f"{len(events_ch) - len(counted)} usage rows belong to no known key"
            )
    if report.duplicated_in_clickhouse:
        await store.command("OPTIMIZE TABLE usage_events FINAL")
        report.repaired["clickhouse duplicates collapsed"] = len(report.duplicated_in_clickhouse)
    # Last, so that the rows restored or collapsed above are counted as they now are.
    await _repair_rollups(store, report)


async def _repair_rollups(store: ClickHouseStore, report: Report) -> None:
    rollups = await store.repair_rollups(Scope.between(report.start, report.end))
    if rollups.corrected:
        report.repaired["rollup groups corrected"] = sum(rollups.corrected.values())
    if rollups.rebuilt:
        report.repaired["rollup groups rebuilt"] = sum(rollups.rebuilt.values())
    if rollups.keys_added:
        report.repaired["rollup periods given their keys again"] = rollups.keys_added
    if rollups.above:
        report.flagged.append(
            f"{len(rollups.above)} active-key periods count keys the raw events no longer have"
        )


def reconcile_floor(settings: Settings, now: datetime | None = None) -> datetime:
    """The earliest instant reconcile compares: the start of the day after the shorter
    retention's cutoff (a day of margin: an event's debit is booked after its request)."""
    days = [d for d in (settings.usage_retention_days, settings.order_retention_days) if d]
    if not days:
        return datetime.min.replace(tzinfo=UTC)
    kept_from = (now or datetime.now(UTC)) - timedelta(days=min(days) - 1)
    return kept_from.replace(hour=0, minute=0, second=0, microsecond=0)


async def reconcile(
    settings: Settings, start: datetime, end: datetime, *, repair: bool = False
) -> Report:
    """Compare (and with `repair`, fix) the ledger and ClickHouse over [start, end). Never
    before the usage retention: there ClickHouse has dropped the raw events on purpose, and
    the ledger (and the model-level rollups) keep the totals. Never before the order
    retention either: there the ledger has carried its rows forward into one per key, and
    a raw event without its debit must not be "repaired" by debiting it again."""
    from apifast.db import create_pool

    start = max(start, reconcile_floor(settings))
    end = max(end, start)
    from apifast.metering.clickhouse import ClickHouseStore

    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    store = ClickHouseStore(settings.clickhouse_url, settings.clickhouse_database)
    try:
        await store.start()
        report, sides = await _compare(pool, store, start, end)
        if repair and not report.clean:
            await _repair(settings, pool, store, report, sides)
            after, _ = await _compare(pool, store, start, end)
            after.repaired, after.flagged = report.repaired, report.flagged
            # A mismatch is only ever flagged, so it survives the repair.
            report = after
        return report
    finally:
        await store.close()
        await pool.close()


__all__ = ["KeyTotals", "Mismatch", "Report", "reconcile"]
