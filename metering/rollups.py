"""The dashboards' rollups, checked against the raw events and repaired.

The rollups (`migrations/clickhouse/0002_rollups.sql`) are filled by materialized views when
the meter inserts into `usage_events`. That insert is not atomic across the views: a meter
killed (or a view failing) mid-insert can leave the raw rows stored and some views' rows not.
The redelivered events are then found already stored and skipped, so nothing would ever add
them to the rollups. Two things repair them, both by the same rule:

- the meter, for the groups touched by events it finds already stored (`repair_for_events`:
  only on redelivery, one check per table per batch);
- `apifast reconcile --repair`, for every group of a range.

The rule: recompute each group's sums from `usage_events FINAL` and compare them with the
rollup's. A group that is short (no sum above the raw one) gets one correction row with the
differences: the `SimpleAggregateFunction(sum)` columns add up, so the group becomes exact,
and a second run finds nothing to add. The distinct-key states are sets, so the keys are
simply added again. A group above the raw sums (a duplicate row collapsed since) cannot be
lowered by adding; reconcile deletes and rebuilds it (`rebuild_groups`), the meter leaves it
to reconcile.

The latency digests of `usage_hourly`/`usage_daily` are not compared: a correction row
carries an empty digest, so the percentiles of a repaired period leave out the latencies of
the events the crash lost from the views (at most one batch). A rebuilt group's digest is
recomputed from the raw events, so it is exact again.

Everything here runs on the store's ClickHouse thread (`client` is a clickhouse-connect
client); the store wraps it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal

from apifast.db import Queries

Q = Queries("apifast.metering")
Unit = Literal["hour", "day"]
_STEP = {"hour": timedelta(hours=1), "day": timedelta(days=1)}


@dataclass(frozen=True, slots=True)
class SumRollup:
    """A rollup table of sums per group, and the SQL that checks and rebuilds it."""

    table: str
    unit: Unit
    groups: tuple[str, ...]
    sums: tuple[str, ...]
    by_key: bool  # grouped by key_hash: can be checked for some keys only


SUM_ROLLUPS = (
    SumRollup(
        "usage_key_daily", "day", ("key_hash", "day", "model"),
        ("requests", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens",
         "cost_usd"),
        by_key=True,
    ),
    SumRollup(
        "usage_hourly", "hour", ("period", "model", "provider"),
        ("requests", "errors", "input_tokens", "output_tokens", "cost_usd", "upstream_cost_usd"),
        by_key=False,
    ),
    SumRollup(
        "usage_daily", "day", ("period", "model", "provider"),
        ("requests", "errors", "input_tokens", "output_tokens", "cost_usd", "upstream_cost_usd"),
        by_key=False,
    ),
)  # fmt: skip
KEY_ROLLUPS: tuple[tuple[str, Unit], ...] = (
    ("active_keys_hourly", "hour"),
    ("active_keys_daily", "day"),
)


@dataclass
class RollupDifference:
    """One rollup group that disagrees with the raw events: both sides of each column."""

    table: str
    group: dict[str, str]
    raw: dict[str, int | Decimal]
    rollup: dict[str, int | Decimal]

    @property
    def short(self) -> bool:
        """Below the raw events and nowhere above: an added correction makes it exact."""
        return all(self.raw[c] >= self.rollup[c] for c in self.raw)


@dataclass
class Scope:
    """Which rollup groups to check: the periods (hour starts, day starts, UTC) and, for the
    per-key rollup, the keys (None: all of them)."""

    hours: list[datetime]
    days: list[datetime]
    keys: list[str] | None = None

    @classmethod
    def of_events(cls, events: Iterable[Mapping[str, Any]]) -> Scope:
        """The periods and keys of these usage events (as published: `ts` in ms)."""
        moments = [datetime.fromtimestamp(int(e["ts"]) / 1000, tz=UTC) for e in events]
        keys = sorted({str(e["key_hash"]) for e in events})
        return cls(
            hours=sorted({_floor(m, "hour") for m in moments}),
            days=sorted({_floor(m, "day") for m in moments}),
            keys=keys,
        )

    @classmethod
    def between(cls, start: datetime, end: datetime) -> Scope:
        """Every whole hour and day that [start, end) touches, for every key."""
        return cls(hours=_periods(start, end, "hour"), days=_periods(start, end, "day"))

    def periods(self, unit: Unit) -> list[datetime]:
        return self.hours if unit == "hour" else self.days

    def params(self, unit: Unit) -> dict[str, Any]:
        """The query parameters of the periods of `unit`: the list, and the span it covers
        (a range on `ts` the engine can prune by)."""
        periods = self.periods(unit)
        return {
            "periods": periods,
            "days": [p.date() for p in periods],
            "lo": periods[0],
            "hi": periods[-1] + _STEP[unit],
            "all_keys": self.keys is None,
            "keys": self.keys or [],
        }


@dataclass
class RollupRepair:
    """What one repair did: correction rows added per table, groups rebuilt, and the
    groups left above the raw events (only reconcile rebuilds those)."""

    corrected: dict[str, int] = field(default_factory=dict)
    rebuilt: dict[str, int] = field(default_factory=dict)
    above: list[RollupDifference] = field(default_factory=list)
    keys_added: int = 0  # distinct-key periods given their keys again


def _utc(moment: datetime) -> datetime:
    """ClickHouse hands DateTime values back naive; they are UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _floor(moment: datetime, unit: Unit) -> datetime:
    moment = _utc(moment)
    if unit == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    return datetime.combine(moment.date(), time.min, UTC)


def _periods(start: datetime, end: datetime, unit: Unit) -> list[datetime]:
    out, period = [], _floor(start, unit)
    while period < _utc(end):
        out.append(period)
        period += _STEP[unit]
    return out


def _text(value: Any) -> str:
    """ClickHouse FixedString comes back as bytes, DateTime naive (it is UTC)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    return value.isoformat() if isinstance(value, date) else str(value)


def _rows(client: Any, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    result = client.query(sql, parameters=params)
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


def find_differences(client: Any, scope: Scope) -> list[RollupDifference]:
    """The groups of the sum rollups, within `scope`, that disagree with the raw events:
    one query per table."""
    found: list[RollupDifference] = []
    for rollup in SUM_ROLLUPS:
        if not scope.periods(rollup.unit) or (rollup.by_key and scope.keys == []):
            continue
        sql = getattr(Q, f"rollup_check_{rollup.table}")
        for row in _rows(client, sql, scope.params(rollup.unit)):
            found.append(
                RollupDifference(
                    table=rollup.table,
                    group={g: _text(row[g]) for g in rollup.groups},
                    raw={c: row[f"raw_{c}"] for c in rollup.sums},
                    rollup={c: row[f"rollup_{c}"] for c in rollup.sums},
                )
            )
    return found


def find_key_differences(client: Any, scope: Scope) -> list[RollupDifference]:
    """The periods whose distinct-key count differs from the raw events' (all keys)."""
    found: list[RollupDifference] = []
    for table, unit in KEY_ROLLUPS:
        if not scope.periods(unit):
            continue
        for row in _rows(client, getattr(Q, f"rollup_check_{table}"), scope.params(unit)):
            found.append(
                RollupDifference(
                    table=table,
                    group={"period": _text(row["period"])},
                    raw={"keys": int(row["raw_keys"])},
                    rollup={"keys": int(row["rollup_keys"])},
                )
            )
    return found


def add_keys(client: Any, scope: Scope) -> None:
    """Add the scope's keys to the distinct-key rollups again (idempotent)."""
    for table, unit in KEY_ROLLUPS:
        if scope.periods(unit) and scope.keys != []:
            client.command(getattr(Q, f"rollup_add_{table}"), parameters=scope.params(unit))


def _group_value(column: str, text: str) -> Any:
    if column == "period":
        return datetime.fromisoformat(text)
    if column == "day":
        return date.fromisoformat(text)
    return text


def add_corrections(client: Any, differences: Iterable[RollupDifference]) -> dict[str, int]:
    """Insert, for each short group, one row of the differences (raw - rollup); one insert
    per table. Omitted aggregate columns (the latency digest) get an empty state."""
    added: dict[str, int] = {}
    for rollup in SUM_ROLLUPS:
        rows = [
            [_group_value(g, d.group[g]) for g in rollup.groups]
            + [d.raw[c] - d.rollup[c] for c in rollup.sums]
            for d in differences
            if d.table == rollup.table and d.short
        ]
        if rows:
            client.insert(rollup.table, rows, column_names=[*rollup.groups, *rollup.sums])
            added[rollup.table] = len(rows)
    return added


def rebuild_groups(client: Any, differences: Iterable[RollupDifference]) -> dict[str, int]:
    """Delete the groups above the raw events and rebuild them from the raw events; two
    statements per table. For `apifast reconcile --repair` only: a reader sees the group
    empty for a moment, and an insert into the same group racing with it could be counted
    twice (the next reconcile finds and rebuilds it)."""
    rebuilt: dict[str, int] = {}
    for rollup in SUM_ROLLUPS:
        groups = [d.group for d in differences if d.table == rollup.table and not d.short]
        if not groups:
            continue
        tuples = [tuple(_group_value(g, group[g]) for g in rollup.groups) for group in groups]
        # The span of the groups' periods, for the rebuild to prune the raw events by.
        when = "day" if rollup.by_key else "period"
        starts = sorted(_floor(_utc(datetime.fromisoformat(g[when])), rollup.unit) for g in groups)
        client.command(getattr(Q, f"rollup_delete_{rollup.table}"), parameters={"groups": tuples})
        client.command(
            getattr(Q, f"rollup_rebuild_{rollup.table}"),
            parameters={"groups": tuples, "lo": starts[0], "hi": starts[-1] + _STEP[rollup.unit]},
        )
        rebuilt[rollup.table] = len(groups)
    return rebuilt


def repair_for_events(client: Any, events: Sequence[Mapping[str, Any]]) -> RollupRepair:
    """The meter's repair, for events it found already stored (a redelivery): the groups they
    fall in are checked against the raw events and the short ones corrected."""
    scope = Scope.of_events(events)
    add_keys(client, scope)
    repair = RollupRepair()
    differences = find_differences(client, scope)
    repair.corrected = add_corrections(client, differences)
    repair.above = [d for d in differences if not d.short]
    return repair


def _starts(differences: Iterable[RollupDifference], table: str) -> list[datetime]:
    """The periods of a distinct-key rollup's differences."""
    return sorted({datetime.fromisoformat(d.group["period"]) for d in differences
                   if d.table == table})  # fmt: skip


def repair_scope(client: Any, scope: Scope) -> RollupRepair:
    """`apifast reconcile --repair`: correct the short groups, rebuild those above the raw
    events, and give the periods short of keys all their keys again. Periods with keys the
    raw events no longer have cannot be lowered; they are returned in `above`."""
    differences = find_differences(client, scope)
    repair = RollupRepair(corrected=add_corrections(client, differences))
    repair.rebuilt = rebuild_groups(client, differences)
    key_differences = find_key_differences(client, scope)
    short = [d for d in key_differences if d.short]
    if short:
        hours = _starts(short, "active_keys_hourly")
        add_keys(client, Scope(hours=hours, days=_starts(short, "active_keys_daily")))
        repair.keys_added = len(short)
    repair.above = [d for d in key_differences if not d.short]
    return repair
