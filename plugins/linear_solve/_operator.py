"""The diffusion operator of a block of systems, matrix-free on any array backend; what
every rung of the ladder shares (the right-hand side, the float64 estimate, the true
residual as misfit); and the preconditioned CG iteration two of them run, with its two
preconditioners."""

from __future__ import annotations

from collections.abc import Callable, Mapping

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


PRECONDITIONERS = ("spectral", "jacobi")
"""The preconditioners of the mixed-precision rung's inner solves (:func:`preconditioner`)."""


def jacobi(operator: DiffusionOperator) -> Callable[[Array], Array]:
    """``r -> diag(A)^-1 r`` in float32."""
    return lambda r: r / operator.diagonal32


def preconditioner(name: str, operator: DiffusionOperator, coefficients: Array, backend: ArrayBackend) -> Callable[[Array], Array]:
    """``r -> M^-1 r`` for the block, in float32: ``jacobi`` (:func:`jacobi`) or ``spectral``
    (:class:`SpectralPreconditioner`); ``ValueError`` for another name."""
    if name == "jacobi":
        return jacobi(operator)
    if name == "spectral":
        return SpectralPreconditioner(operator, coefficients, backend)
    raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, not {name!r}")


class SpectralPreconditioner:
    """``r -> S^-1 L^-1 S^-1 r``, each system of the block its own, in float32: ``L`` the
    operator of constant diffusivities (per axis, the geometric mean of the system's: its
    anisotropy is kept) with values mirrored with opposite sign one half cell outside the
    grid, and ``S = sqrt(diag(A) / diag(L))``, so that ``S L S`` matches ``A`` on its
    diagonal and follows a smoothly varying diffusivity. Symmetric positive definite, as CG
    needs. ``L^-1`` is exact: ``L`` is diagonal in the type-II sine basis (eigenvalues
    ``sum_axis c_axis (2 - 2 cos(pi m / n))``, ``m = 1 .. n``), so it costs two sine
    transforms where the backend has them (:attr:`~rqml_dask.arrays.ArrayBackend.has_sine_transforms`),
    else two real FFTs of the antisymmetric extension along every axis (twice the grid per
    axis: a periodic operator, with the same eigenvalues and no constant mode), which every
    backend has and which costs about 3x the sine transforms on NumPy. On the shipped
    high-contrast systems it cuts the CG iterations to a few dozen where Jacobi's need
    thousands (BENCHMARKS.md)."""

    def __init__(self, operator: DiffusionOperator, coefficients: Array, backend: ArrayBackend) -> None:
        xp = self.xp = backend.xp
        self.backend = backend
        k = xp.astype(coefficients, xp.float64)
        self.grid = grid = tuple(k.shape[2:])
        self.extended = tuple(2 * n for n in grid)
        self.by_sine_transforms = backend.has_sine_transforms
        scale = xp.exp(xp.mean(xp.log(k), axis=tuple(range(2, k.ndim))))  # (count, rank)
        if self.by_sine_transforms:
            modes = [xp.arange(1, n + 1, dtype=xp.float64) for n in grid]
        else:  # a real FFT of the extension keeps half its last axis
            modes = [xp.arange(m, dtype=xp.float64) for m in (*self.extended[:-1], grid[-1] + 1)]
        eigenvalues = xp.zeros((k.shape[0], *(m.shape[0] for m in modes)), dtype=xp.float64)
        for axis, (n, m) in enumerate(zip(grid, modes)):
            shape = [1] * (len(grid) + 1)
            shape[axis + 1] = m.shape[0]
            wave = xp.reshape(2 - 2 * xp.cos(xp.pi * m / n), tuple(shape))
            eigenvalues = eigenvalues + xp.reshape(scale[:, axis], (-1,) + (1,) * len(grid)) * wave
        positive = eigenvalues > 0  # zero only for the constant mode, which the mirror does not have
        self.inverse_eigenvalues = xp.astype(xp.where(positive, 1 / xp.where(positive, eigenvalues, 1.0), 0.0), xp.float32)
        diagonal_l = 2 * xp.reshape(xp.sum(scale, axis=1), (-1,) + (1,) * len(grid))
        self.inverse_root = xp.astype(1 / xp.sqrt(operator.diagonal / diagonal_l), xp.float32)

    def __call__(self, r: Array) -> Array:
        scaled = self.inverse_root * r
        solved = self._by_sine_transforms(scaled) if self.by_sine_transforms else self._by_mirrored_fft(scaled)
        solved *= self.inverse_root
        return solved

    def _by_sine_transforms(self, r: Array) -> Array:
        spectrum = self.backend.sine_transform(r, len(self.grid))
        spectrum *= self.inverse_eigenvalues
        return self.backend.sine_transform(spectrum, len(self.grid), inverse=True)

    def _by_mirrored_fft(self, r: Array) -> Array:
        xp = self.xp
        mirrored = r
        for axis in range(1, mirrored.ndim):
            mirrored = _concat(xp)([mirrored, -xp.flip(mirrored, axis=axis)], axis=axis)
        spectrum = self.backend.rfftn(mirrored, self.extended)
        spectrum *= self.inverse_eigenvalues
        solved = self.backend.irfftn(spectrum, self.extended)
        return solved[(slice(None), *(slice(0, n) for n in self.grid))]


def cg_iteration(xp, operator: DiffusionOperator, precondition: Callable[[Array], Array], r: Array, p: Array,
                 rz: Array) -> tuple[Array, Array, Array, Array]:
    """One preconditioned CG iteration, every system at once, in float32: the residual
    ``r``, direction ``p`` and ``rz = r . M^-1 r`` in, the step to add to the solution and
    the next ``r``, ``p`` and ``rz`` out. A solved system stays solved."""
    q = operator.apply(p)
    curvature = dot(xp, p, q)
    alpha = xp.where(curvature > 0, rz / xp.where(curvature > 0, curvature, 1), 0)
    r = r - alpha * q
    z = precondition(r)
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
