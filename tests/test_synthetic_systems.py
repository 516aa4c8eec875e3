"""``rqml data synth --kind systems``: the matrix, the reference solutions and the store a linear_solve pipeline reads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import zarr

from rqml_dask import Pipeline
from rqml_dask.synthetic import SystemsSpec, diffusion_matrix, face_coefficients, write_systems

from conftest import systems_dict, write_yaml


def difference_form(coefficients: np.ndarray) -> scipy.sparse.csr_matrix:
    """``sum_a D_a^T diag(k_a) D_a``, each ``D_a`` (faces x cells) built by Kronecker products: the definition."""
    grid = coefficients.shape[1:]
    matrix = scipy.sparse.csr_matrix((math.prod(grid), math.prod(grid)))
    for axis, k in enumerate(face_coefficients(coefficients)):
        n = grid[axis]
        difference = scipy.sparse.diags([np.ones(n), -np.ones(n)], [0, -1], shape=(n + 1, n))
        d = scipy.sparse.kron(scipy.sparse.identity(math.prod(grid[:axis])),
                              scipy.sparse.kron(difference, scipy.sparse.identity(math.prod(grid[axis + 1:]))))
        matrix = matrix + d.T @ scipy.sparse.diags(k.ravel()) @ d
    return matrix.tocsr()


@pytest.mark.parametrize("grid", [(2, 2), (9, 11), (2, 3, 2), (5, 7, 6)])
def test_the_matrix_assembled_from_its_diagonals_is_the_difference_form(grid):
    coefficients = 10 ** (3 * np.random.default_rng(0).random((len(grid), *grid)))
    assembled = diffusion_matrix(coefficients)
    assert abs(assembled - difference_form(coefficients)).max() <= 1e-12 * abs(assembled).max()
    assert abs(assembled - assembled.T).max() == 0


@pytest.mark.parametrize("grid, contrast, anisotropy", [((6, 8, 10), 1000, 4), ((40, 40), 10**6, 100)])
def test_synthetic_systems_are_what_a_linear_solve_pipeline_reads_with_direct_grade_solutions(tmp_path, grid, contrast, anisotropy):
    store = write_systems(tmp_path / "systems.zarr", SystemsSpec(kind="systems", grid=grid, count=3, contrast=contrast,
                                                                 anisotropy=anisotropy, seed=2))
    group = zarr.open_group(store, mode="r")
    assert {name: (group[name].shape, group[name].dtype) for name in group.keys()} == {
        "rhs": ((3, *grid), np.float64), "coefficients": ((3, len(grid), *grid), np.float64), "truth": ((3, *grid), np.float64)}
    config = systems_dict(store, tmp_path / "out.zarr", tiling={"tile": [1, *grid], "halo": 0})
    assert len(Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config)).prepare()) == 3  # input and operator accepted
    for i in range(3):
        matrix, b, x = diffusion_matrix(group["coefficients"][i]), group["rhs"][i].ravel(), group["truth"][i].ravel()
        direct = scipy.sparse.linalg.spsolve(matrix.tocsc(), b)
        assert np.linalg.norm(b - matrix @ x) / np.linalg.norm(b) < 1e-11  # 100 times below linear_solve's tightest target
        assert np.linalg.norm(x - direct) / np.linalg.norm(direct) < 1e-12
