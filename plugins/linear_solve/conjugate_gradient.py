"""Jacobi-preconditioned conjugate gradient in float32: the middle rung."""

from __future__ import annotations

from collections.abc import Mapping

from rqml_dask.models import Array, ArrayBackend
from rqml_plugins.linear_solve._operator import DiffusionModel, cg_iteration, dot, jacobi


class ConjugateGradient(DiffusionModel):
    """Preconditioned CG (preconditioner ``diag(A)``), one iteration per step, every system
    of the block at once. The vectors are float32 (half the memory traffic of float64, and
    on a GPU twice the rate) and the solution is accumulated in float64, so its true
    residual falls until float32's rounding of the recursive residual stops it, near
    ``1e-7 * cond(A)``: a tolerance below that stalls it, and the ladder moves on. (Not the
    spectral preconditioner of the rung above: with it, float32 CG reaches its floor in a
    few iterations and, run on past it without restarts, diverged on the 64x64 systems.)"""

    family = "conjugate_gradient"
    size = 2

    def __init__(self, problem: Mapping[str, Array], backend: ArrayBackend) -> None:
        super().__init__(problem, backend)
        self.precondition = jacobi(self.operator)
        self.start()

    def start(self, estimate: Array | None = None) -> None:
        xp = self.xp
        super().start(estimate)
        self._r = xp.astype(self.b - self.operator.apply(self._x), xp.float32)
        z = self.precondition(self._r)
        self._p = z
        self._rz = dot(xp, self._r, z)

    def step(self) -> None:
        xp = self.xp
        step, self._r, self._p, self._rz = cg_iteration(xp, self.operator, self.precondition, self._r, self._p, self._rz)
        self._x = self._x + xp.astype(step, xp.float64)

    def state(self) -> dict[str, Array]:
        return {"estimate": self._x, "residual": self._r, "direction": self._p, "rz": self._rz}

    def restore(self, state: Mapping[str, Array]) -> None:
        xp = self.xp
        self._x = xp.astype(state["estimate"], xp.float64, copy=True)
        self._r = xp.astype(state["residual"], xp.float32, copy=True)
        self._p = xp.astype(state["direction"], xp.float32, copy=True)
        self._rz = xp.astype(state["rz"], xp.float32, copy=True)
