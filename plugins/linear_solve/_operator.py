"""The diffusion operator of a block of systems, matrix-free on any array backend; what
every rung of the ladder shares (the right-hand side, the float64 estimate, the true
residual as misfit) and the preconditioned CG iteration two of them run."""

from __future__ import annotations

from collections.abc import Mapping

from rqml_dask.models import Array, ArrayBackend, RefinementModel


class DiffusionOperator:
    """``A x`` for every system of a block at once: ``x`` is (count, *grid), ``coefficients``
    (count, rank, *grid). Face diffusivities are harmonic means of neighbouring cells (the
    cell's own at the boundary), as :func:`rqml_dask.synthetic.face_coefficients`; kept in
    float64 and in float32, :meth:`apply` uses those of ``x``'s dtype."""

    def __init__(self, coefficients: Array, backend: ArrayBackend) -> None:
        xp = self.xp = backend.xp
        k = xp.astype(coefficients, xp.float64)
        self.rank = k.shape[1]
        self.faces = []
        for axis in range(self.rank):
            cells = k[:, axis, ...]
            left, right = self._take(cells, axis, 1, None), self._take(cells, axis, None, -1)
            inner = 2 * left * right / (left + right)
            first, last = self._take(cells, axis, 0, 1), self._take(cells, axis, -1, None)
            self.faces.append(_concat(xp)([first, inner, last], axis=axis + 1))
        self.inner = [self._take(f, axis, 1, -1) for axis, f in enumerate(self.faces)]  # faces between two cells
        self.inner32 = [xp.astype(f, xp.float32) for f in self.inner]
        self.diagonal = sum(self._take(f, axis, 0, -1) + self._take(f, axis, 1, None) for axis, f in enumerate(self.faces))
        self.diagonal32 = xp.astype(self.diagonal, xp.float32)

    def _take(self, x: Array, axis: int, start: int | None, stop: int | None) -> Array:
        return x[_along(axis, start, stop)]

    def apply(self, x: Array) -> Array:
        """``A x`` in ``x``'s dtype (float32 or float64): the diagonal's term, less each
        axis's coupling through its inner faces (a zero Dirichlet boundary has none)."""
        xp = self.xp
        inner = self.inner32 if x.dtype == xp.float32 else self.inner
        out = (self.diagonal32 if x.dtype == xp.float32 else self.diagonal) * x
        for axis, k in enumerate(inner):
            first, rest = _along(axis, None, -1), _along(axis, 1, None)
            out[first] -= k * x[rest]
            out[rest] -= k * x[first]
        return out

    def norms(self, x: Array) -> Array:
        """The 2-norm of each system's part of ``x`` (count,), in float64."""
        xp = self.xp
        x = xp.astype(x, xp.float64)
        return xp.sqrt(xp.sum(x * x, axis=tuple(range(1, x.ndim))))

    def relative_residual(self, x: Array, b: Array) -> float:
        """The worst ``||b_i - A_i x_i|| / ||b_i||`` of the block, all in float64."""
        xp = self.xp
        x64 = xp.astype(x, xp.float64)
        residual = self.norms(b - self.apply(x64))
        scale = self.norms(b)
        return float(xp.max(residual / xp.where(scale > 0, scale, 1.0)))


def _along(axis: int, start: int | None, stop: int | None) -> tuple:
    """The index of ``start:stop`` along grid axis ``axis`` of a (count, *grid) array."""
    return (slice(None),) * (axis + 1) + (slice(start, stop), ...)


def _concat(xp):
    return getattr(xp, "concat", None) or xp.concatenate


def dot(xp, a: Array, b: Array) -> Array:
    """Per-system inner products, shaped to broadcast against a (count, *grid) array."""
    axes = tuple(range(1, a.ndim))
    return xp.sum(a * b, axis=axes, keepdims=True)


def cg_iteration(xp, operator: DiffusionOperator, r: Array, p: Array, rz: Array) -> tuple[Array, Array, Array, Array]:
    """One Jacobi-preconditioned CG iteration, every system at once, in float32: the residual
    ``r``, direction ``p`` and ``rz = r . diag(A)^-1 r`` in, the step to add to the
    solution and the next ``r``, ``p`` and ``rz`` out. A solved system stays solved."""
    q = operator.apply(p)
    curvature = dot(xp, p, q)
    alpha = xp.where(curvature > 0, rz / xp.where(curvature > 0, curvature, 1), 0)
    r = r - alpha * q
    z = r / operator.diagonal32
    rz_next = dot(xp, r, z)
    beta = xp.where(rz > 0, rz_next / xp.where(rz > 0, rz, 1), 0)
    return alpha * p, r, z + beta * p, rz_next


class DiffusionModel(RefinementModel):
    """What every linear_solve model shares: ``b`` (float64), the operator, the float64
    estimate ``_x`` (zero, or a copy of the estimate another model left) and the misfit,
    the worst true relative residual of the block in float64."""

    task_class = "linear_solve"

    def __init__(self, problem: Mapping[str, Array], backend: ArrayBackend) -> None:
        super().__init__(problem, backend)
        self.b = self.xp.astype(problem["image"], self.xp.float64)
        self.operator = DiffusionOperator(problem["coefficients"], backend)

    def start(self, estimate: Array | None = None) -> None:
        xp = self.xp
        self._x = xp.zeros_like(self.b) if estimate is None else xp.astype(estimate, xp.float64, copy=True)

    @property
    def estimate(self) -> Array:
        return self._x

    def misfit(self) -> float:
        return self.operator.relative_residual(self._x, self.b)
