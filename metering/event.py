"""The usage event: what is kept of a request, and the one definition of its shape.

The router builds a `UsageEvent` and publishes `to_bytes()`. The meter checks each decoded
event with `event_problem`, then stores it as `event_row`, in `EVENT_COLUMNS` order (the
columns of `migrations/clickhouse/0001_usage_events.sql`). `apifast reconcile` rebuilds a lost
one from its ledger debit with `event_from_ledger_row`. `FIELDS` lists every published key
once; the column list, the counters and the defaults are derived from it.

Counts, cost, model and timestamps only: there is deliberately no field that could hold
request or response content.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import orjson

from apifast.money import ZERO
from apifast.providers import Usage

SCHEMA_VERSION = 1

ColumnType = Literal["String", "UInt32", "UInt16", "Bool", "Decimal", "DateTime64"]
REQUIRED: Any = object()  # an EventField default: a stored event must have this key


@dataclass(frozen=True, slots=True)
class EventField:
    """One key of a published event. `column` is its ClickHouse type (None: not stored);
    `default` is what an event without the key is checked and stored with."""

    name: str
    column: ColumnType | None
    default: Any = REQUIRED


# Every key of a published event, in the order `to_bytes` writes them.
FIELDS: tuple[EventField, ...] = (
    EventField("v", None),
    EventField("generation_id", "String"),
    EventField("key_hash", "String"),  # hex of the key's SHA-256
    EventField("key_id", None),
    EventField("model", "String"),
    EventField("provider", "String", ""),
    EventField("upstream_model", "String", ""),
    EventField("endpoint", "String", "chat"),
    EventField("input_tokens", "UInt32", 0),
    EventField("output_tokens", "UInt32", 0),
    EventField("cached_tokens", "UInt32", 0),
    EventField("cache_write_tokens", "UInt32", 0),
    EventField("reasoning_tokens", "UInt32", 0),
    EventField("usage_estimated", "Bool", False),
    EventField("cost_usd", "Decimal", "0"),  # a decimal string
    EventField("upstream_cost_usd", "Decimal", "0"),
    EventField("reserved_usd", None),
    EventField("latency_ms", "UInt32", 0),
    EventField("ttft_ms", "UInt32", 0),
    EventField("status", "UInt16", 200),
    EventField("outcome", "String", "ok"),
    EventField("stream", "Bool", False),
    EventField("ts", "DateTime64"),  # request start, Unix milliseconds
    EventField("api", "String", "chat"),  # the client protocol: chat | messages | responses
    # What the upstream reported beyond the hold: not charged (cost_usd is capped at the
    # hold), recorded by the meter as an upstream overage.
    EventField("overage_usd", None, "0"),
    # 0: the request's final event. n > 0: the n-th checkpoint of a stream still running (what
    # it had delivered by then); the meter keeps the latest and bills it only if the final
    # event never comes (its router died).
    EventField("checkpoint", None, 0),
    # The router's balance lease the request was served from ("" for its own hold): the meter
    # takes the debit out of that lease's hold.
    EventField("lease", None, ""),
    # Which of the model's routes answered (its place in the catalog, never a name a client
    # sees), and how many route attempts the request made (0: none was admitted).
    EventField("route_index", "UInt16", 0),
    EventField("attempts", "UInt16", 0),
)
EVENT_COLUMNS = tuple(f.name for f in FIELDS if f.column is not None)
COUNT_FIELDS = tuple(f.name for f in FIELDS if f.column == "UInt32")
MONEY_FIELDS = tuple(f.name for f in FIELDS if f.column == "Decimal")
SMALL_FIELDS = tuple(f.name for f in FIELDS if f.column == "UInt16" and f.name != "status")
STRING_FIELDS = tuple(f.name for f in FIELDS if f.column == "String" and f.default is not REQUIRED)
_DEFAULTS = {f.name: f.default for f in FIELDS}
_UINT32 = 1 << 32
# The most tokens one count of an event can carry (its UInt32 column): the meter refuses an
# event with more, so the router believes no upstream count from this up (billed_usage.py).
MAX_TOKEN_COUNT = _UINT32 - 1


@dataclass(slots=True)
class UsageEvent:
    generation_id: str
    key_hash: bytes
    key_id: int
    model: str
    endpoint: str  # chat | embeddings
    stream: bool
    reserved_usd: Decimal
    provider: str = ""  # internal only: never shown to clients
    upstream_model: str = ""  # internal only
    usage: Usage = field(default_factory=Usage)
    cost_usd: Decimal = ZERO
    upstream_cost_usd: Decimal = ZERO
    status: int = 200
    outcome: str = "ok"  # ok | upstream_error | client_disconnect | refused
    usage_estimated: bool = False
    started_at: float = field(default_factory=time.time)
    latency_ms: int = 0
    ttft_ms: int = 0
    api: str = "chat"  # the client protocol: chat | messages | responses
    overage_usd: Decimal = ZERO  # priced usage beyond the hold; never charged
    checkpoint: int = 0  # 0: final; n: a running stream's n-th checkpoint
    lease: str = ""  # the balance lease that holds this request's money, if any
    route_index: int = 0  # the answering route's index in the model's routes
    attempts: int = 0  # route attempts made (across the client's `models`)
    # The router's own, never published: settle this hold as soon as the request ends.
    settle_early: bool = False

    def to_bytes(self) -> bytes:
        """The published event: the keys of FIELDS, in order."""
        u = self.usage
        return orjson.dumps(
            {
                "v": SCHEMA_VERSION,
                "generation_id": self.generation_id,
                "key_hash": self.key_hash.hex(),
                "key_id": self.key_id,
                "model": self.model,
                "provider": self.provider,
                "upstream_model": self.upstream_model,
                "endpoint": self.endpoint,
                "input_tokens": u.input_tokens,
                "output_tokens": u.output_tokens,
                "cached_tokens": u.cached_tokens,
                "cache_write_tokens": u.cache_write_tokens,
                "reasoning_tokens": u.reasoning_tokens,
                "usage_estimated": self.usage_estimated,
                "cost_usd": str(self.cost_usd),
                "upstream_cost_usd": str(self.upstream_cost_usd),
                "reserved_usd": str(self.reserved_usd),
                "latency_ms": self.latency_ms,
                "ttft_ms": self.ttft_ms,
                "status": self.status,
                "outcome": self.outcome,
                "stream": self.stream,
                "ts": round(self.started_at * 1000),
                "api": self.api,
                "overage_usd": str(self.overage_usd),
                "checkpoint": self.checkpoint,
                "lease": self.lease,
                "route_index": self.route_index,
                "attempts": self.attempts,
            }
        )


def message_id(generation_id: str, checkpoint: int = 0) -> str:
    """The stream's dedupe id (Nats-Msg-Id) of a published event: its generation id, with
    the checkpoint number for a checkpoint (so a checkpoint never shadows the final event)."""
    return f"{generation_id}.cp{checkpoint}" if checkpoint else generation_id


def event_problem(event: Any) -> str | None:
    """Why a decoded event can never be stored (so it must not block the stream), or None.

    Only what would make a write fail forever is checked: a batch that fails is retried
    until it succeeds, so one poisoned event would otherwise stop all billing.
    """
    if not isinstance(event, dict):
        return "not an object"
    gid = event.get("generation_id")
    if not isinstance(gid, str) or not gid or len(gid) > 200:
        return "bad generation_id"
    key_hash = event.get("key_hash")
    if not isinstance(key_hash, str) or len(key_hash) != 64:
        return "bad key_hash"
    try:
        bytes.fromhex(key_hash)
    except ValueError:
        return "bad key_hash"
    if not isinstance(event.get("model"), str):
        return "bad model"
    if "cost_usd" not in event:
        return "no cost_usd"
    for name in MONEY_FIELDS:
        try:
            amount = Decimal(str(event.get(name, _DEFAULTS[name])))
        except InvalidOperation:
            return f"bad {name}"
        if not amount.is_finite() or amount < 0 or amount >= Decimal(10) ** 18:
            return f"bad {name}"
    ts = event.get("ts")
    if not isinstance(ts, int) or not 0 < ts < 1 << 45:
        return "bad ts"
    for name in COUNT_FIELDS:
        value = event.get(name, _DEFAULTS[name])
        if not isinstance(value, int) or not 0 <= value < _UINT32:
            return f"bad {name}"
    for name in SMALL_FIELDS:
        value = event.get(name, _DEFAULTS[name])
        if not isinstance(value, int) or not 0 <= value < 1 << 16:
            return f"bad {name}"
    for name in STRING_FIELDS:
        if not isinstance(event.get(name, _DEFAULTS[name]), str):
            return f"bad {name}"
    checkpoint = event.get("checkpoint", 0)
    if not isinstance(checkpoint, int) or not 0 <= checkpoint < _UINT32:
        return "bad checkpoint"
    lease = event.get("lease", "")
    if not isinstance(lease, str) or len(lease) > 200:
        return "bad lease"
    status = event.get("status", _DEFAULTS["status"])
    if not isinstance(status, int) or not 0 <= status < 1 << 16:
        return "bad status"
    return None


def _same(value: Any) -> Any:
    return value


def _from_ms(ms: Any) -> datetime:
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC)


_TO_COLUMN: dict[ColumnType, Callable[[Any], Any]] = {
    "String": _same,
    "UInt32": int,
    "UInt16": int,
    "Bool": bool,
    "Decimal": Decimal,
    "DateTime64": _from_ms,
}
_ROW = tuple((f.name, f.default, _TO_COLUMN[f.column]) for f in FIELDS if f.column is not None)


def event_row(event: Mapping[str, Any]) -> list[Any]:
    """A usage event (as published) in EVENT_COLUMNS order; money stays Decimal."""
    return [
        to_column(event[name] if default is REQUIRED else event.get(name, default))
        for name, default, to_column in _ROW
    ]


def event_from_ledger_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The event of a ledger debit whose usage row was lost: the cost is exact, the rest is
    unknown (stored with the defaults of FIELDS)."""
    created: datetime = row["created_at"]
    return {
        "generation_id": row["generation_id"],
        "key_hash": bytes(row["key_hash"]).hex(),
        "model": "(reconciled)",
        "endpoint": "unknown",
        "cost_usd": str(row["cost_usd"]),
        "outcome": "reconciled",
        "ts": int(created.timestamp() * 1000),
    }
