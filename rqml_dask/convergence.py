"""Convergence heuristics: stability, consistency and novelty.

:class:`ConvergenceMonitor` reads two figures at each check, both supplied by the engine:
the estimate's relative change over the last iteration, and the data misfit the model
recomputes apart from its iterations. It keeps the misfit history of the current model only; a model switch
starts a new monitor. Its verdict is one of ``continue``, ``converged`` or ``stalled``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from rqml_dask.task import ConvergenceSettings

Verdict = Literal["continue", "converged", "stalled"]


@dataclass(frozen=True)
class ConvergenceFigures:
    """The three heuristics at the latest check (``None`` until there is enough history)."""

    iteration: int
    misfit: float
    stability: float
    consistency: float | None
    novelty: float | None


@dataclass
class ConvergenceMonitor:
    """Evaluates the heuristics of one model's run on one task."""

    settings: ConvergenceSettings
    escalates: bool = False  # a stall moves the task on to another model (not the ladder's last)
    history: deque[tuple[int, float]] = field(default_factory=deque)
    latest: ConvergenceFigures | None = None
    held_out: tuple[int, float] | None = None

    def observe(self, iteration: int, change: float, misfit: float, held_out: float | None = None) -> Verdict:
        """Record a check at ``iteration`` (iterations counted within this model's run).
        ``held_out`` is the held-out score where the task holds data out: consistency is
        then its relative change per iteration instead of the misfit's; with ``target_misfit``
        it is the misfit itself."""
        s = self.settings
        if not math.isfinite(misfit) or not math.isfinite(change):
            self.latest = ConvergenceFigures(iteration, misfit, change, None, None)
            return "stalled"
        consistency = None
        if self.held_out is not None and held_out is not None:
            last_iteration, last = self.held_out
            consistency = abs(last - held_out) / max(abs(last), 1e-300) / (iteration - last_iteration)
        elif s.target_misfit is not None:
            consistency = misfit  # a solver's true residual, against its requested tolerance
        elif held_out is None and self.history:
            last_iteration, last_misfit = self.history[-1]
            consistency = abs(last_misfit - misfit) / max(last_misfit, 1e-300) / (iteration - last_iteration)
        if held_out is not None:
            self.held_out = (iteration, held_out)
        self.history.append((iteration, misfit))
        novelty = self._novelty(iteration, misfit)
        self.latest = ConvergenceFigures(iteration, misfit, change, consistency, novelty)
        tolerance = s.consistency_tol if s.target_misfit is None else s.target_misfit
        if consistency is not None and change <= s.stability_tol and consistency <= tolerance:
            return "converged"
        if novelty is not None and (novelty < s.min_progress or self._out_of_reach(iteration, misfit)):
            return "stalled"
        return "continue"

    def _out_of_reach(self, iteration: int, misfit: float) -> bool:
        """With ``target_misfit`` and ``max_iterations_per_model``, on a model the task can
        escalate from: whether the misfit, falling on at its geometric rate over the novelty
        window, would reach the target only past the model's budget (a model that would be
        stopped there anyway, after spending it). Never on the ladder's last model, where a
        stall ends the task: a rate that picks up (CG's does) may still reach the target."""
        s = self.settings
        if not self.escalates or not s.target_misfit or s.max_iterations_per_model is None or misfit <= s.target_misfit:
            return False
        first_iteration, first_misfit = self.history[0]
        if not 0 < misfit < first_misfit:
            return False  # no fall to project (a rise is the novelty's to judge)
        rate = math.log(misfit / first_misfit) / (iteration - first_iteration)  # < 0: log misfit per iteration
        return iteration + math.log(s.target_misfit / misfit) / rate > s.max_iterations_per_model

    def _novelty(self, iteration: int, misfit: float) -> float | None:
        """Relative misfit improvement over the last ``novelty_window`` iterations."""
        window = self.settings.novelty_window
        while len(self.history) > 1 and self.history[1][0] <= iteration - window:
            self.history.popleft()
        first_iteration, first_misfit = self.history[0]
        if iteration - first_iteration < window:
            return None
        return (first_misfit - misfit) / max(first_misfit, 1e-300)
