"""Adaptive concurrency of the refinement queue: how many tasks a device interleaves.

A hill climber run once per measurement window: under memory pressure it halves the limit;
otherwise it probes one more task whenever the last probe paid (throughput rose by more than
``gain``), steps back when a probe did not pay or when throughput falls by more than
``2 * gain`` from one window to the next (a slowdown), and then holds for ``hold_windows``
before probing again. Throughput is voxel-iterations
per second of busy time, so idle windows (nothing to refine) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdaptiveConcurrency:
    minimum: int = 1
    maximum: int = 8
    limit: int = 1
    gain: float = 0.05
    memory_high: float = 0.85
    hold_windows: int = 10
    _last_throughput: float | None = None
    _probing: bool = False
    _hold: int = 0

    def __post_init__(self) -> None:
        self.limit = min(max(self.limit, self.minimum), self.maximum)

    def bound(self, minimum: int, maximum: int) -> None:
        """Apply new bounds (from a new policy), clamping the current limit."""
        self.minimum, self.maximum = minimum, max(minimum, maximum)
        self.limit = min(max(self.limit, self.minimum), self.maximum)

    def update(self, throughput: float, memory_pressure: float, saturated: bool) -> int:
        """One window's reading; ``saturated``: the queue held ``limit`` tasks all window."""
        if memory_pressure >= self.memory_high:
            self.limit = max(self.minimum, self.limit // 2)
            self._probing, self._hold, self._last_throughput = False, self.hold_windows, None
            return self.limit
        last, self._last_throughput = self._last_throughput, throughput
        if self._probing and last is not None:
            self._probing = False
            if throughput < last * (1 + self.gain):
                self.limit = max(self.minimum, self.limit - 1)
                self._hold = self.hold_windows
                return self.limit
        if last is not None and throughput < last * (1 - 2 * self.gain) and self.limit > self.minimum:
            self.limit -= 1
            self._hold = self.hold_windows
        elif self._hold > 0:
            self._hold -= 1
        elif saturated and self.limit < self.maximum:
            self.limit += 1
            self._probing = True
        return self.limit
