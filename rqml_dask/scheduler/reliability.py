"""A node's reliability: a decaying record of how its tasks ended, with exponential backoff.

Successes and failures (crashes, errors, timeouts, validation failures) are counted with
exponential decay (``half_life`` seconds), so a node that stops failing regains its weight
over time. ``score`` is ``(successes + 1) / (successes + 1 + penalty * failures)`` in (0, 1].
Consecutive failures put the node in backoff for ``base * 2**(k-1)`` seconds (capped), during
which its weight is multiplied by ``backoff_factor``; a success ends the streak and the
backoff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Reliability:
    half_life: float = 60.0
    penalty: float = 3.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    backoff_factor: float = 0.05
    successes: float = 0.0
    failures: float = 0.0
    streak: int = 0
    backoff_until: float = 0.0
    updated_at: float = 0.0

    def _decay(self, now: float) -> None:
        if self.updated_at:
            factor = math.exp(-math.log(2) * max(now - self.updated_at, 0.0) / self.half_life)
            self.successes *= factor
            self.failures *= factor
        self.updated_at = now

    def success(self, now: float) -> None:
        self._decay(now)
        self.successes += 1
        self.streak = 0
        self.backoff_until = min(self.backoff_until, now)

    def failure(self, now: float) -> None:
        self._decay(now)
        self.failures += 1
        self.streak += 1
        self.backoff_until = now + min(self.backoff_base * 2 ** (self.streak - 1), self.backoff_cap)

    def score(self, now: float) -> float:
        self._decay(now)
        value = (self.successes + 1) / (self.successes + 1 + self.penalty * self.failures)
        return value * (self.backoff_factor if now < self.backoff_until else 1.0)
