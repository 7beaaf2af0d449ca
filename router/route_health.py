"""One route's health: a circuit breaker, and benching on an upstream's Retry-After.

closed --(consecutive failures, or the error rate over the last `window` outcomes)--> open
open --(cooldown passed)--> half-open: one probe goes through
half-open --(probe succeeds)--> closed; --(probe fails)--> open again

A 429 or 503 (or Anthropic's 529) with Retry-After benches the route that long, whatever its
breaker says. Time comes from the caller (`now`, from an injectable clock), so tests need no
sleeps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failures: int = 5  # consecutive failures that open the breaker
    error_rate: float = 0.5  # ... or this share of the last `window` outcomes failing
    window: int = 20
    cooldown_s: float = 30.0

    @property
    def min_samples(self) -> int:
        # An error rate over a handful of requests says little: wait for half a window.
        return max(2, self.window // 2)


class Breaker:
    __slots__ = ("benched_until", "consecutive", "opened_at", "outcomes", "policy", "probing",
                 "state")  # fmt: skip

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.state = CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self.benched_until = 0.0
        self.probing = False
        self.outcomes: deque[bool] = deque(maxlen=policy.window)  # True: a failure

    def available(self, now: float) -> bool:
        """Whether a request may be sent now, without taking the probe slot."""
        if self.benched_until > now:
            return False
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now - self.opened_at >= self.policy.cooldown_s
        return not self.probing

    def admit(self, now: float) -> bool:
        """Take the route for one attempt: always when closed; once half-open, only the one
        probe. Returns False if the route must be skipped."""
        if self.benched_until > now:
            return False
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            if now - self.opened_at < self.policy.cooldown_s:
                return False
            self.state = HALF_OPEN
            self.probing = False
        if self.probing:
            return False
        self.probing = True
        return True

    def succeeded(self) -> bool:
        """Record a success; True when the breaker changed state (it closed)."""
        self.consecutive = 0
        self.outcomes.append(False)
        if self.state != CLOSED:
            self.close()
            return True
        return False

    def failed(self, now: float) -> bool:
        """Record a failure; True when the breaker opened."""
        self.consecutive += 1
        outcomes = self.outcomes
        outcomes.append(True)
        policy = self.policy
        if self.state == HALF_OPEN:
            self.open(now)
            return True
        if self.state == CLOSED and (
            self.consecutive >= policy.failures
            or (
                len(outcomes) >= policy.min_samples
                and sum(outcomes) >= policy.error_rate * len(outcomes)
            )
        ):
            self.open(now)
            return True
        return False

    def abandoned(self) -> None:
        """The attempt ended without an outcome (a cancelled request): free the probe."""
        self.probing = False

    def bench(self, now: float, seconds: float) -> bool:
        """Rest the route `seconds` (an upstream's Retry-After); True if it was not already."""
        until = now + seconds
        if until <= self.benched_until:
            return False
        self.benched_until = until
        return True

    def open(self, now: float) -> None:
        self.state = OPEN
        self.opened_at = now
        self.probing = False

    def close(self) -> None:
        self.state = CLOSED
        self.consecutive = 0
        self.probing = False
        self.outcomes.clear()

    def error_rate(self) -> float:
        outcomes = self.outcomes
        return sum(outcomes) / len(outcomes) if outcomes else 0.0

    def shown_state(self, now: float) -> str:
        """closed | open | half_open | benched, for the admin overview."""
        if self.benched_until > now:
            return "benched"
        if self.state == OPEN and now - self.opened_at >= self.policy.cooldown_s:
            return HALF_OPEN  # the next request is the probe
        return self.state
