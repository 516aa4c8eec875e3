"""Weighted Jacobi: the smallest rung of the linear_solve ladder."""

from __future__ import annotations

from collections.abc import Mapping

from rqml_dask.models import Array, ArrayBackend
from rqml_plugins.linear_solve._operator import DiffusionModel


class Jacobi(DiffusionModel):
    """``x <- x + weight * (b - A x) / diag(A)``, in float64. Cheap per iteration and
    convergent for these matrices, but its error falls by about ``1 - 1/cond(A)`` per
    iteration: it stalls on a fine or high-contrast grid, and the ladder moves on."""

    family = "jacobi"
    size = 1
    immutable_state = True

    def __init__(self, problem: Mapping[str, Array], backend: ArrayBackend, *, weight: float = 0.8) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], not {weight!r}")
        super().__init__(problem, backend)
        self.weight = float(weight)
        self.start()

    def step(self) -> None:
        residual = self.b - self.operator.apply(self._x)
        self._x = self._x + self.weight * residual / self.operator.diagonal
