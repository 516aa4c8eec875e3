"""Per-peer rate limits: a token bucket for each (peer, handler), and a throttle that lets
one report a window through for each subject.

Both are plain bookkeeping over a clock the caller passes (``time.monotonic()``), with no
timers: a bucket refills as time passes, and a throttle counts what it held back so that the
next report it lets through can say how many there were.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rate:
    """At most ``burst`` calls at once, refilled at ``per_second``."""

    burst: float
    per_second: float

    def __str__(self) -> str:
        return f"{self.burst:g} at once, {self.per_second:g}/s"


@dataclass
class TokenBucket:
    """``rate.burst`` tokens, one taken per call, refilled at ``rate.per_second``."""

    rate: Rate
    tokens: float
    stamp: float

    def take(self, now: float) -> bool:
        """Take a token if there is one (``False``: the call is over the rate)."""
        self.tokens = min(self.rate.burst, self.tokens + (now - self.stamp) * self.rate.per_second)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate.per_second >= self.rate.burst


@dataclass
class RateLimits:
    """A :class:`TokenBucket` per (peer, handler) for the handlers ``rates`` names; a
    handler it does not name is not limited. Buckets back at their burst are forgotten once
    more than ``kept`` are held, so a stream of new peers cannot grow it without bound."""

    rates: Mapping[str, Rate]
    kept: int = 10_000
    buckets: dict[tuple[str, str], TokenBucket] = field(default_factory=dict)

    def allow(self, peer: str, handler: str, now: float) -> bool:
        """Whether ``peer`` may call ``handler`` now (taking a token if so)."""
        rate = self.rates.get(handler)
        if rate is None:
            return True
        bucket = self.buckets.get((peer, handler))
        if bucket is None:
            if len(self.buckets) >= self.kept:
                self.buckets = {key: b for key, b in self.buckets.items() if not b.full(now)}
            bucket = self.buckets[(peer, handler)] = TokenBucket(rate, rate.burst, now)
        return bucket.take(now)


@dataclass
class Throttle:
    """Lets one report per subject through every ``window`` seconds and counts the others."""

    window: float
    kept: int = 10_000
    last: dict[Hashable, float] = field(default_factory=dict)
    held: dict[Hashable, int] = field(default_factory=dict)

    def admit(self, subject: Hashable, now: float) -> int | None:
        """``None`` if a report on ``subject`` went through less than ``window`` ago (this one
        is counted); else the number held back since the last one (this one goes through)."""
        last = self.last.get(subject)
        if last is not None and now - last < self.window:
            self.held[subject] = self.held.get(subject, 0) + 1
            return None
        if len(self.last) >= self.kept:
            self.last = {key: t for key, t in self.last.items() if now - t < self.window}
            self.held = {key: n for key, n in self.held.items() if key in self.last}
        self.last[subject] = now
        return self.held.pop(subject, 0)

