"""A regularisation strength chosen per task from its held-out counts.

A regularising model family names the parameter that sets how strongly it regularises
(:attr:`~rqml_dask.models.RefinementModel.strength`: TV-RL's ``regularization``). A pipeline
that gives that parameter as ``auto`` (the family's ``strength_grid``) or as a list of values
has each task choose. When the task reaches that rung, its result so far (the held-out optimum
of the earlier rungs: the λ = 0 result) is the *origin*, and the family runs once per value,
weakest first, from its own start as it would alone. The strength and the iteration are
chosen together, by the held-out *object* error
(:meth:`~rqml_dask.held_out.HeldOutScore.object_error`): each candidate is scored by it at
every check and stops ``held_out_patience`` iterations past its minimum, and the search stops
at the first candidate whose error is above the one before. Of the candidates that beat the
origin by more than :data:`SIGNIFICANCE` standard errors of the held-out noise, the one with
the lowest error replaces it; where none does, the origin stays: a strength is used only
where the data show it helps. The held-out deviance cannot make this choice: it scores the
blurred prediction, which regularisation never improves (BENCHMARKS: "Choosing a TV-RL
strength from the held-out counts", "A TV-RL strength chosen by the data").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from rqml_dask.arrays import Array
from rqml_dask.models import RefinementModel

SIGNIFICANCE = 1.0
"""How many standard errors of the held-out noise a candidate's object error must lie below
the origin's for the candidate to count (one: "beats it by more than its noise"; per tile the
evidence is weak at low counts, and a candidate that truly does not help costs little)."""

AUTO = "auto"
"""The value of a model's strength parameter that asks for its own grid of strengths."""


def strength_grid(model: type[RefinementModel], params: Mapping[str, Any]) -> tuple[float, ...] | None:
    """The strengths a task chooses among for ``model`` built with ``params``, or ``None``
    where its strength is fixed (or it has none). Raises :class:`ValueError` naming the
    parameter where the list is empty or holds anything but finite numbers >= 0. Sorted,
    without repeats: the search runs them weakest first (:class:`StrengthSearch`)."""
    name = model.strength
    if name is None or name not in params:
        return None
    value = params[name]
    if value == AUTO:
        return tuple(sorted(model.strength_grid))
    if not isinstance(value, list | tuple):
        return None
    if not value or not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < math.inf for v in value):
        raise ValueError(f"{name} must be a number, {AUTO!r}, or a non-empty list of finite numbers >= 0, not {value!r}")
    return tuple(sorted({float(v) for v in value}))


@dataclass
class StrengthSearch:
    """One task's search over the strengths of model ``model`` (a rung of its ladder).

    Every candidate must beat ``origin`` (the model state of iterate ``origin_iteration``,
    held-out deviance ``origin_held_out``), the result of the rungs before. ``index``
    is the candidate running (``len(strengths)`` once the search is over), ``last_error`` the
    object error of the one before (the strengths run in increasing order, and the search
    stops at the first whose error is above the one before it: the object error is taken to
    have one minimum in the strength, and stronger ones do worse still); ``best_*`` is the
    best finished candidate so far that beats the start (its strength, object error,
    iteration, deviance and state; :data:`SIGNIFICANCE`), ``significance`` its
    :meth:`~rqml_dask.held_out.HeldOutScore.object_significance` against the start.
    ``chosen`` is the strength kept once the search is over (``0.0`` where none beat the
    start, whose iterate is then the result)."""

    model: str
    strengths: tuple[float, ...]
    origin: Array
    origin_iteration: int
    origin_held_out: float
    index: int = 0
    last_error: float = math.inf
    best_strength: float | None = None
    best_error: float = math.inf
    best_iteration: int = 0
    best_held_out: float = math.inf
    best_estimate: Array | None = None
    chosen: float | None = None
    significance: float | None = None

    @property
    def running(self) -> bool:
        return self.index < len(self.strengths)

    @property
    def strength(self) -> float:
        """The strength a model of this family is built with now: the running candidate's,
        else the chosen one."""
        return self.strengths[self.index] if self.running else float(self.chosen or 0.0)

    def state(self) -> dict:
        """Everything but the two arrays, JSON/msgpack-friendly (:meth:`from_state`)."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("origin", "best_estimate")}
        state["strengths"] = list(self.strengths)  # not asdict(): it would deep-copy both arrays first
        return {name: (None if isinstance(v, float) and math.isinf(v) else v) for name, v in state.items()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], origin: Array, best_estimate: Array | None) -> StrengthSearch:
        figures = {name: (math.inf if value is None and name in ("best_error", "best_held_out", "origin_held_out", "last_error")
                          else value) for name, value in state.items()}
        figures["strengths"] = tuple(float(s) for s in figures["strengths"])
        return cls(origin=origin, best_estimate=best_estimate, **figures)
