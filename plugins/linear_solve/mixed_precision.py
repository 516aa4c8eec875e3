"""Mixed-precision iterative refinement: float32 solves, float64 residuals and corrections."""

from __future__ import annotations

from collections.abc import Mapping

from rqml_dask.models import Array, ArrayBackend
from rqml_plugins.linear_solve._operator import DiffusionModel, cg_iteration, dot
from rqml_plugins.linear_solve._operator import preconditioner as make_preconditioner


class MixedPrecisionRefinement(DiffusionModel):
    """One step is one refinement: the residual ``r = b - A x`` in float64, the correction
    ``A d = r`` solved approximately in float32 (preconditioned CG, at most
    ``inner_iterations`` iterations or until its residual fell by ``inner_tolerance``), and
    ``x += d`` in float64; the inner solve is preconditioned by ``preconditioner``
    (``spectral``, the default, or ``jacobi``: see
    :func:`~rqml_plugins.linear_solve._operator.preconditioner`). Each step gains about
    ``-log10(inner_tolerance)`` digits while float32 can resolve the correction
    (``cond(M^-1 A) * 1e-7 < 1``),
    so float32 solves reach a float64-grade true residual. A system whose residual did not
    halve over the last step has reached what float64 can resolve: it is left as it is
    (no more solves), so steps after convergence cost one residual, not a solve."""

    family = "mixed_precision"
    size = 3
    immutable_state = True
    check_every = 1  # a step is a whole inner solve: a check (one residual) costs next to nothing beside it

    def __init__(self, problem: Mapping[str, Array], backend: ArrayBackend, *, inner_iterations: int = 1000,
                 inner_tolerance: float = 1e-4, preconditioner: str = "spectral") -> None:
        if inner_iterations < 1 or not 0 < inner_tolerance < 1:
            raise ValueError(f"inner_iterations ({inner_iterations}) must be >= 1 and inner_tolerance "
                             f"({inner_tolerance}) in (0, 1)")
        super().__init__(problem, backend)
        self.inner_iterations, self.inner_tolerance = int(inner_iterations), float(inner_tolerance)
        self.precondition = make_preconditioner(preconditioner, self.operator, problem["coefficients"], backend)
        self.start()

    def start(self, estimate: Array | None = None) -> None:
        xp = self.xp
        super().start(estimate)
        self._last = xp.full((self.b.shape[0],), xp.inf, dtype=xp.float64)  # each system's previous residual norm

    def step(self) -> None:
        xp = self.xp
        residual = self.b - self.operator.apply(self._x)
        norms = self.operator.norms(residual)
        active = norms < 0.5 * self._last
        self._last = xp.where(active, norms, self._last)
        if not bool(xp.any(active)):
            return  # every system at float64's limit
        axes = (slice(None),) + (None,) * (residual.ndim - 1)
        residual = xp.where(active[axes], residual, 0.0)
        scale = xp.max(xp.abs(residual), axis=tuple(range(1, residual.ndim)), keepdims=True)
        scale = xp.where(scale > 0, scale, 1.0)  # float32 keeps its range: solve for r / scale
        correction = self._solve32(xp.astype(residual / scale, xp.float32))
        self._x = self._x + xp.astype(correction, xp.float64) * scale

    def _solve32(self, r: Array) -> Array:
        """Approximately solve ``A d = r`` in float32 (preconditioned CG from 0)."""
        xp, operator = self.xp, self.operator
        d = xp.zeros_like(r)
        z = self.precondition(r)
        p, rz = z, dot(xp, r, z)
        stop = rz * self.inner_tolerance**2
        for _ in range(self.inner_iterations):
            step, r, p, rz = cg_iteration(xp, operator, self.precondition, r, p, rz)
            d = d + step
            if bool(xp.all(rz <= stop)):
                break
        return d

    def state(self) -> dict[str, Array]:
        return {"estimate": self._x, "residual_norms": self._last}

    def restore(self, state: Mapping[str, Array]) -> None:
        self.start(state["estimate"])
        self._last = self.xp.astype(state["residual_norms"], self.xp.float64, copy=True)
