"""The linear_solve task class and its ladder: Jacobi, conjugate gradient, mixed precision.

A task is a block of systems ``A_i x_i = b_i`` (``A_i = -div(K_i grad)`` on a grid, zero
Dirichlet boundaries: :func:`rqml_dask.synthetic.diffusion_matrix` assembles the same
matrix): its core along the first axis of the right-hand sides ``rhs`` (count, *grid)
selects the systems, the whole grid of each; the operator is the diffusivity per axis and
cell, ``coefficients`` (count, rank, *grid). Everything is float64; the models choose
where to compute in float32. A model's misfit is the worst true relative residual
``||b_i - A_i x_i|| / ||b_i||`` of the block, recomputed in float64: what a pipeline sets
``convergence.target_misfit`` and ``validation.max_misfit`` against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rqml_dask.models import Array, ArrayBackend, TaskClass


class LinearSolve(TaskClass):
    """Blocks of anisotropic diffusion systems, one system per index of the first axis."""

    name = "linear_solve"
    operator_key = "coefficients"
    default_operator = "coefficients"
    default_output = "solution"
    dtype = "float64"

    def read_operator(self, operator: Any, core: tuple[tuple[int, int], ...], image_shape: tuple[int, ...]) -> np.ndarray:
        if tuple(operator.shape) != (image_shape[0], len(image_shape) - 1, *image_shape[1:]):
            raise ValueError(f"must have shape (count, rank, *grid) = {(image_shape[0], len(image_shape) - 1, *image_shape[1:])}")
        if any(b - a != n for (a, b), n in zip(core[1:], image_shape[1:])):
            raise ValueError(f"a task must hold whole systems: tile the grid axes whole, not {core[1:]}")
        coefficients = np.asarray(operator[core[0][0]:core[0][1]], dtype=np.float64)
        if not (np.all(np.isfinite(coefficients)) and coefficients.min() > 0):
            raise ValueError(f"systems {core[0][0]}:{core[0][1]}: every diffusivity must be finite and positive")
        return coefficients

    def halo(self, operator: np.ndarray, image_ndim: int, iterations: int) -> tuple[int, ...]:
        return (0,) * image_ndim

    def probe_problem(self, backend: ArrayBackend) -> dict[str, Array]:
        grid = np.indices((6, 7), dtype=np.float64)
        rhs = np.sin(grid[0] + 2 * grid[1])[None]
        coefficients = (1.0 + grid / 4)[None]
        rhs = backend.asarray(rhs)
        return {"image": rhs, "observed": rhs, "coefficients": backend.asarray(coefficients)}
