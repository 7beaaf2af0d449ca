"""The usage event: what is kept of a request. Counts, cost, model and timestamps only;
there is deliberately no field that could hold request or response content."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal

import orjson

from apifast.money import ZERO
from apifast.providers import Usage

SCHEMA_VERSION = 1


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

    def to_bytes(self) -> bytes:
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
            }
        )
