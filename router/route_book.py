"""Every route's health and observations on this router, kept per model, and the attempt
budget of one request. The request core (`router/route_calls.py`) asks it for a request's
attempt order, admits each attempt (breaker, bench, `max_concurrency`) and reports how it
went; `health_share.py` publishes breaker changes to the other routers and applies theirs.

State lives in memory only, keyed by model id and route index; a catalog change that alters
a model's routes starts that model afresh. The clock and the random source are injectable.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apifast.catalog.toml import Model, Route
from apifast.providers import UpstreamError
from apifast.router.route_choice import EXPLORE, RouteEntry, attempt_order
from apifast.router.route_health import CLOSED, OPEN, Breaker, BreakerPolicy

log = logging.getLogger("apifast.router")

# Upstream statuses that, with a Retry-After, bench the route that long: a rate limit, and
# "busy" (the usual 503, and Anthropic's 529 overloaded_error, which means the same).
BENCHING = frozenset({429, 503, 529})

# (model id, route index, what happened: "open" | "closed" | "benched", seconds it lasts)
ChangeHook = Callable[[str, RouteEntry, str, float], None]


def fingerprint(route: Route) -> str:
    """Which route a shared report is about (routers with another catalog ignore it)."""
    return f"{route.provider}\x1f{route.model}"


@dataclass(slots=True)
class Budget:
    """What one request may still spend on attempts, across its `models` too."""

    attempts: int
    deadline: float  # on the book's clock
    used: int = 0

    def spent(self, now: float) -> bool:
        return self.used >= self.attempts or (self.used > 0 and now >= self.deadline)


class RouteBook:
    def __init__(
        self,
        policy: BreakerPolicy,
        *,
        max_attempts: int = 3,
        deadline_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        explore: float = EXPLORE,
    ) -> None:
        self.policy = policy
        self.max_attempts = max_attempts
        self.deadline_s = deadline_s
        self.clock = clock
        self.rng = rng or random.Random()
        self.explore = explore
        self.on_change: ChangeHook | None = None
        self._models: dict[str, tuple[tuple[Route, ...], list[RouteEntry]]] = {}

    # --- per request ------------------------------------------------------------------------

    def budget(self) -> Budget:
        return Budget(self.max_attempts, self.clock() + self.deadline_s)

    def entries(self, model: Model) -> list[RouteEntry]:
        known = self._models.get(model.id)
        routes = model.routes
        if known is not None:
            if known[0] is routes:
                return known[1]
            if known[0] == routes:  # the same routes in a rebuilt catalog: keep their state
                self._models[model.id] = (routes, known[1])
                return known[1]
        entries = [RouteEntry(i, r, Breaker(self.policy)) for i, r in enumerate(routes)]
        self._models[model.id] = (routes, entries)
        return entries

    def order(self, model: Model, strategy: str | None = None) -> list[RouteEntry]:
        """The model's routes in the order this request tries them."""
        return attempt_order(
            strategy or model.strategy, list(self.entries(model)), self.rng, self.explore
        )

    def admit(self, entry: RouteEntry) -> bool:
        """Take `entry` for an attempt now, or False to skip it (open, benched, probing
        elsewhere, or at its max_concurrency). An admitted attempt counts as in flight until
        `release`."""
        limit = entry.route.max_concurrency
        if limit is not None and entry.stats.in_flight >= limit:
            return False
        if not entry.breaker.admit(self.clock()):
            return False
        entry.stats.in_flight += 1
        return True

    def wait_s(self, entries: list[RouteEntry]) -> int:
        """Whole seconds until one of `entries` takes traffic again (for Retry-After)."""
        now, cooldown = self.clock(), self.policy.cooldown_s
        waits = []
        for e in entries:
            b = e.breaker
            until = b.opened_at + cooldown if b.state == OPEN else now
            waits.append(max(until, b.benched_until) - now)
        return max(1, math.ceil(min(waits))) if waits else 1

    def succeeded(self, model_id: str, entry: RouteEntry, ttfb_s: float) -> None:
        entry.stats.observe_ttfb(ttfb_s)
        if entry.breaker.succeeded():
            log.info("model %s route %d: breaker closed", model_id, entry.index)
            self._changed(model_id, entry, "closed", 0.0)

    def failed(self, model_id: str, entry: RouteEntry, exc: UpstreamError) -> None:
        """An attempt failed: bench on Retry-After, count toward the breaker if the route is
        at fault (a retryable error other than a rate limit)."""
        entry.stats.in_flight -= 1
        self.broke(model_id, entry, exc)

    def broke(self, model_id: str, entry: RouteEntry, exc: UpstreamError) -> None:
        """Judge a failure for the route's health; a stream that broke after its first byte
        comes here too (it is not retried, but the route is not healthy)."""
        now = self.clock()
        breaker = entry.breaker
        if exc.status in BENCHING and exc.retry_after_s is not None:
            breaker.abandoned()
            if breaker.bench(now, exc.retry_after_s):
                self._changed(model_id, entry, "benched", exc.retry_after_s)
        elif exc.status == 429 or not exc.retryable:
            breaker.abandoned()  # a rate limit, or the request's own fault: not the route's
        elif breaker.failed(now):
            log.warning("model %s route %d: breaker open", model_id, entry.index)
            self._changed(model_id, entry, "open", self.policy.cooldown_s)

    def abandoned(self, entry: RouteEntry) -> None:
        entry.stats.in_flight -= 1
        entry.breaker.abandoned()

    def release(self, entry: RouteEntry, output_tokens: int = 0, seconds: float = 0.0) -> None:
        """The request on `entry` is over; its output rate feeds the throughput EWMA."""
        entry.stats.in_flight -= 1
        if output_tokens and seconds > 0:
            entry.stats.observe_throughput(output_tokens, seconds)

    def _changed(self, model_id: str, entry: RouteEntry, what: str, seconds: float) -> None:
        hook = self.on_change
        if hook is not None:
            try:
                hook(model_id, entry, what, seconds)
            except Exception as exc:  # sharing is best effort; local state stands
                log.warning("route health hook failed: %s", type(exc).__name__)

    # --- reports from other routers ---------------------------------------------------------

    def apply(self, model: Model, index: int, print_: str, what: str, seconds: float) -> bool:
        """Another router's breaker change for `model`'s route `index`; True if applied."""
        entries = self.entries(model)
        if not 0 <= index < len(entries) or fingerprint(entries[index].route) != print_:
            return False
        breaker, now = entries[index].breaker, self.clock()
        seconds = max(0.0, min(seconds, 3600.0))
        if what == "open":
            if breaker.state == OPEN:
                return False
            breaker.open(now - max(0.0, self.policy.cooldown_s - seconds))
        elif what == "closed":
            if breaker.state == CLOSED:
                return False
            breaker.close()
        elif what == "benched":
            return breaker.bench(now, seconds)
        else:
            return False
        return True

    def open_reports(self) -> list[tuple[str, RouteEntry, str, float]]:
        """What another router starting now should learn from this one: each open breaker
        (with the cooldown it has left) and each bench (with the time it has left), in the
        terms of `on_change` reports. A half-open route is left out: its probe decides."""
        now, cooldown = self.clock(), self.policy.cooldown_s
        reports = []
        for model_id, (_, entries) in self._models.items():
            for entry in entries:
                b = entry.breaker
                if b.state == OPEN and b.opened_at + cooldown > now:
                    reports.append((model_id, entry, "open", b.opened_at + cooldown - now))
                if b.benched_until > now:
                    reports.append((model_id, entry, "benched", b.benched_until - now))
        return reports

    # --- the admin overview -----------------------------------------------------------------

    def snapshot(self, models: dict[str, Model]) -> list[dict[str, Any]]:
        """Every route of every served model: state, recent error rate and observations.
        Provider names are in it: it is for the operator's panel only."""
        now = self.clock()
        rows = []
        for model_id in sorted(models):
            model = models[model_id]
            for entry in self.entries(model):
                b, s = entry.breaker, entry.stats
                rows.append({
                    "model": model_id, "strategy": model.strategy, "index": entry.index,
                    "provider": entry.route.provider, "upstream_model": entry.route.model,
                    "weight": entry.route.weight,
                    "max_concurrency": entry.route.max_concurrency,
                    "state": b.shown_state(now), "error_rate": b.error_rate(),
                    "samples": len(b.outcomes), "in_flight": s.in_flight,
                    "ttfb_ms": None if s.ttfb_s is None else round(s.ttfb_s * 1000),
                    "tokens_per_s": None if s.tokens_per_s is None else round(s.tokens_per_s, 1),
                })  # fmt: skip
        return rows
