"""The order in which one request tries a model's routes, by the model's `strategy` (or the
client's `route.sort`), from what this router has observed of each route.

- ordered: as listed in the catalog.
- weighted: drawn by `weight` without replacement (weight 0: only as a fallback).
- lowest_cost / sort "price": by the route's upstream `cost_*` (routes without one last).
- lowest_latency / sort "latency": by the expected time to a typical answer: the EWMA of time
  to first byte plus `LATENCY_ANSWER_TOKENS` at the EWMA of output tokens per second (time to
  first byte alone until the rate is measured); a share `explore` of requests puts another
  route first, so a route that recovered is measured, and used, again.
- sort "throughput": by an EWMA of output tokens per second, highest first, exploring too.
- least_busy: fewest requests in flight on this router.

Unmeasured routes sort first under latency and throughput, so each gets measured. Randomness
comes from the caller's `random.Random`, seeded in tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from decimal import Decimal

from apifast.catalog.toml import Route
from apifast.router.route_health import Breaker

EWMA_ALPHA = 0.3  # weight of the newest observation
EXPLORE = 0.1
# A typical answer's length, to weigh a route's output rate against its time to first byte.
LATENCY_ANSWER_TOKENS = 100
# What a client's route.sort asks for, as a strategy.
SORTS = {"price": "lowest_cost", "latency": "lowest_latency", "throughput": "throughput"}


@dataclass(slots=True)
class RouteStats:
    in_flight: int = 0
    ttfb_s: float | None = None  # EWMA of seconds to the first byte
    tokens_per_s: float | None = None  # EWMA of output tokens per second

    def observe_ttfb(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        old = self.ttfb_s
        self.ttfb_s = seconds if old is None else old + EWMA_ALPHA * (seconds - old)

    def observe_throughput(self, tokens: int, seconds: float) -> None:
        if tokens <= 0:
            return
        rate = tokens / max(seconds, 1e-3)
        old = self.tokens_per_s
        self.tokens_per_s = rate if old is None else old + EWMA_ALPHA * (rate - old)


@dataclass(slots=True)
class RouteEntry:
    """One route of one model on this router: its health and what was observed of it."""

    index: int  # its place in the catalog's routes (what usage events record)
    route: Route
    breaker: Breaker
    stats: RouteStats = field(default_factory=RouteStats)


def _cost(entry: RouteEntry) -> tuple[bool, Decimal]:
    cost = entry.route.cost
    total = cost.input_usd_per_mtok + cost.output_usd_per_mtok
    return (not total, total)


def _latency(entry: RouteEntry) -> float:
    stats = entry.stats
    if stats.ttfb_s is None:
        return 0.0  # unmeasured: first, so that it gets measured
    rate = stats.tokens_per_s
    return stats.ttfb_s + (LATENCY_ANSWER_TOKENS / rate if rate else 0.0)


def _explored(ordered: list[RouteEntry], rng: random.Random, explore: float) -> list[RouteEntry]:
    if len(ordered) > 1 and rng.random() < explore:
        pick = 1 + rng.randrange(len(ordered) - 1)
        ordered.insert(0, ordered.pop(pick))
    return ordered


def _weighted(entries: list[RouteEntry], rng: random.Random) -> list[RouteEntry]:
    left = [e for e in entries if e.route.weight > 0]
    out: list[RouteEntry] = []
    while left:
        total = sum(e.route.weight for e in left)
        point = rng.random() * total
        for i, e in enumerate(left):
            point -= e.route.weight
            if point < 0 or i == len(left) - 1:
                out.append(left.pop(i))
                break
    return out + [e for e in entries if e.route.weight <= 0]


def attempt_order(
    strategy: str, entries: list[RouteEntry], rng: random.Random, explore: float = EXPLORE
) -> list[RouteEntry]:
    """The routes of `entries` in the order this request tries them."""
    if len(entries) < 2 or strategy == "ordered":
        return entries
    if strategy == "weighted":
        return _weighted(entries, rng)
    if strategy == "lowest_cost":
        return sorted(entries, key=_cost)
    if strategy == "least_busy":
        return sorted(entries, key=lambda e: e.stats.in_flight)
    if strategy == "lowest_latency":
        by = sorted(entries, key=_latency)
        return _explored(by, rng, explore)
    if strategy == "throughput":
        by = sorted(entries, key=lambda e: -(e.stats.tokens_per_s or float("inf")))
        return _explored(by, rng, explore)
    return entries
