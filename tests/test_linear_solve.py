"""The second task class: batches of diffusion systems, solved up the Jacobi -> CG -> mixed precision ladder."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import zarr
from distributed import Client

from rqml_dask import Pipeline, events
from rqml_dask.arrays import numpy_backend
from rqml_dask.synthetic import diffusion_matrix
from rqml_plugins.linear_solve._operator import DiffusionOperator
from rqml_plugins.linear_solve.conjugate_gradient import ConjugateGradient
from rqml_plugins.linear_solve.mixed_precision import MixedPrecisionRefinement

from conftest import SYSTEMS, systems_dict, write_yaml
from heterogeneous_cluster import heterogeneous_cluster
from timing import bound, wait_for


def systems(store, index: slice):
    group = zarr.open_group(store, mode="r")
    return group["rhs"][index], group["coefficients"][index], group["truth"][index]


def relative_residual(coefficients: np.ndarray, x: np.ndarray, b: np.ndarray) -> float:
    matrix = diffusion_matrix(coefficients)
    return float(np.linalg.norm(b.ravel() - matrix @ x.ravel()) / np.linalg.norm(b))


def test_the_matrix_free_operator_is_the_assembled_matrix_and_the_five_point_laplacian():
    rng = np.random.default_rng(0)
    coefficients = 10 ** rng.random((3, 2, 9, 11))
    x = rng.standard_normal((3, 9, 11))
    applied = DiffusionOperator(coefficients, numpy_backend()).apply(x)
    for i in range(3):
        np.testing.assert_allclose(applied[i].ravel(), diffusion_matrix(coefficients[i]) @ x[i].ravel(), rtol=1e-12, atol=1e-12)
    # unit diffusivity: the standard 5-point Laplacian with Dirichlet boundaries (2 on the diagonal of each 1-D part)
    line = lambda n: scipy.sparse.diags([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1])  # noqa: E731
    laplacian = scipy.sparse.kronsum(line(11), line(9))
    assert abs(diffusion_matrix(np.ones((2, 9, 11))) - laplacian).max() < 1e-12


def test_mixed_precision_reaches_a_float64_residual_from_float32_solves(small_systems, monkeypatch):
    rhs, coefficients, truth = systems(small_systems, slice(0, 2))
    problem = {"image": rhs, "observed": rhs, "coefficients": coefficients}
    cg = ConjugateGradient(problem, numpy_backend())
    for _ in range(600):
        cg.step()
    assert cg.misfit() > 1e-8  # float32 CG stops far above a float64 residual
    dtypes = []
    apply = DiffusionOperator.apply
    monkeypatch.setattr(DiffusionOperator, "apply", lambda self, x: (dtypes.append(x.dtype), apply(self, x))[1])
    refinement = MixedPrecisionRefinement(problem, numpy_backend())
    dtypes.clear()
    refinement.step()
    assert dtypes[0] == np.float64 and set(dtypes[1:]) == {np.dtype(np.float32)}  # one float64 residual, float32 solves
    for _ in range(12):
        refinement.step()
    assert refinement.misfit() < 1e-12
    for i in range(2):
        assert relative_residual(coefficients[i], refinement.estimate[i], rhs[i]) < 1e-12
        np.testing.assert_allclose(refinement.estimate[i], truth[i], rtol=0, atol=1e-9 * np.abs(truth[i]).max())


@pytest.mark.parametrize("transforms", ["sine", "mirrored fft"])
def test_the_spectral_preconditioner_inverts_the_constant_coefficient_operator_exactly(transforms):
    """With constant (anisotropic) diffusivities the scaling is 1 and the preconditioner is
    the inverse of the operator whose values are mirrored with opposite sign half a cell
    outside the grid (``-x`` beyond each edge: 3 on the boundary's diagonal per axis, where
    ``A`` has 2): applied to that operator's product it gives the vector back. By SciPy's
    sine transforms (NumPy's backend) and by the real FFTs of the mirrored grid (a backend
    without sine transforms: NumPy's own FFT here, CuPy's and the array API's elsewhere)."""
    from rqml_dask.arrays import ArrayBackend
    from rqml_plugins.linear_solve._operator import SpectralPreconditioner

    backend = numpy_backend() if transforms == "sine" else ArrayBackend(np, "numpy")
    assert backend.has_sine_transforms == (transforms == "sine")

    grid, scales = (7, 10), (2.0, 0.5)
    coefficients = np.stack([np.full(grid, c) for c in scales])[None]  # (1, rank, *grid)

    def line(n: int) -> scipy.sparse.spmatrix:
        diagonal = 2 * np.ones(n)
        diagonal[[0, -1]] = 3  # the mirrored value beyond the edge
        return scipy.sparse.diags([-np.ones(n - 1), diagonal, -np.ones(n - 1)], [-1, 0, 1])

    operator = scipy.sparse.kron(scales[0] * line(grid[0]), scipy.sparse.eye(grid[1])) + \
        scipy.sparse.kron(scipy.sparse.eye(grid[0]), scales[1] * line(grid[1]))
    x = np.random.default_rng(1).standard_normal(grid)
    precondition = SpectralPreconditioner(DiffusionOperator(coefficients, backend), coefficients, backend)
    got = precondition((operator @ x.ravel()).reshape(1, *grid).astype(np.float32))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[0], x, rtol=0, atol=1e-5 * np.abs(x).max())


def test_the_spectral_preconditioner_cuts_the_inner_iterations_of_mixed_precision(small_systems):
    """On the high-contrast systems both preconditioners reach a float64-grade residual; the
    spectral one with under a fifth of the inner CG iterations (counted as preconditioner
    applications)."""
    rhs, coefficients, truth = systems(small_systems, slice(0, 2))
    problem = {"image": rhs, "observed": rhs, "coefficients": coefficients}
    applications = {}
    for name in ("jacobi", "spectral"):
        refinement = MixedPrecisionRefinement(problem, numpy_backend(), preconditioner=name)
        calls, precondition = [], refinement.precondition
        refinement.precondition = lambda r: (calls.append(1), precondition(r))[1]
        for _ in range(12):
            refinement.step()
        assert refinement.misfit() < 1e-12, name
        np.testing.assert_allclose(refinement.estimate, truth, rtol=0, atol=1e-9 * np.abs(truth).max())
        applications[name] = len(calls)
    assert applications["spectral"] * 5 < applications["jacobi"], applications  # 80 against 610 here
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        MixedPrecisionRefinement(problem, numpy_backend(), preconditioner="ilu")


@pytest.mark.slow
def test_a_run_agrees_with_spsolve_on_every_task_and_its_escalations_show(tmp_path, small_systems, client):
    seen = []
    client.subscribe_topic(events.SUPERVISION, lambda event: seen.append(event[1]))
    config = systems_dict(small_systems, tmp_path / "out.zarr")
    report = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config)).run(client, progress=False)
    assert len(report.outcomes) == SYSTEMS.count // 2 and not report.rejected
    output = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert output.attrs["rqml"]["status"] == "complete" and output["solution"].dtype == np.float64
    rhs, coefficients, _ = systems(small_systems, slice(None))
    for i in range(SYSTEMS.count):
        matrix = diffusion_matrix(coefficients[i])
        direct = scipy.sparse.linalg.spsolve(matrix.tocsc(), rhs[i].ravel())
        solved = output["solution"][i].ravel()
        assert relative_residual(coefficients[i], output["solution"][i], rhs[i]) <= 1e-10  # the requested tolerance
        assert np.linalg.norm(solved - direct) / np.linalg.norm(direct) < 1e-8
    for outcome in report.outcomes:  # ill-conditioned: every rung was needed, and the outcome says why it moved on
        assert [(run.model, run.stop) for run in outcome.models] == [
            ("jacobi", "stalled"), ("conjugate_gradient", "stalled"), ("mixed_precision", "converged")]
        assert outcome.convergence.misfit <= 1e-10 and outcome.escalations == 2
    wait_for(lambda: sum(e["kind"] == "escalated" for e in seen) >= 2 * len(report.outcomes), what="the escalation events")
    escalations = {(e["from_model"], e["to_model"]) for e in seen if e["kind"] == "escalated"}
    assert escalations == {("jacobi", "conjugate_gradient"), ("conjugate_gradient", "mixed_precision")}


@pytest.mark.slow
@pytest.mark.parametrize("tolerance,agreed", [(1e-8, True), (1e-17, False)], ids=["agree", "disagree"])
def test_cross_node_vote_on_a_solve(tmp_path, small_systems, tolerance, agreed):
    """A voter solving from scratch with mixed precision alone, on another node, agrees with
    the ladder's result to the solve's accuracy (about 1e-14), not to the last bit."""
    config = systems_dict(small_systems, tmp_path / "out.zarr", tiling={"tile": [4, *SYSTEMS.grid], "halo": 0},
                          validation={"require_nonnegative": False, "max_misfit": 1e-10,
                                      "vote_models": ["mixed_precision"], "vote_tolerance": tolerance})
    with heterogeneous_cluster([1.0, 1.0]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=bound(60))
        report = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config)).run(client, progress=False)
    assert len(report.outcomes) == 2
    for outcome in report.outcomes:
        vote = outcome.vote
        assert vote["agreed"] is agreed and vote["voters"] != [outcome.node], (vote, outcome.validation_failures)
        assert 1e-17 < vote["differences"]["mixed_precision"] < 1e-8
        assert outcome.accepted is agreed


def test_a_solve_checked_after_every_step_from_its_zero_start_converges(small_systems, tmp_path):
    """The first check compares the first iterate with the zero start: a whole change, not a divergence."""
    from dataclasses import replace

    from rqml_dask.problem import load_problem
    from rqml_dask.refinement import Refinement

    config = systems_dict(small_systems, tmp_path / "out.zarr", models={"ladder": ["mixed_precision"]})
    config["convergence"]["check_every"] = 1
    task = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config)).tasks()[0]
    task, problem = load_problem(task, numpy_backend())
    refinement = Refinement.start(task, problem, numpy_backend())
    refinement.run_to_end()
    assert refinement.status == "converged" and refinement.iteration <= 6
    assert refinement.runs[0].misfit <= 1e-10 and not refinement.validate()


def test_a_refinement_step_is_checked_at_once_whatever_the_pipelines_check_every(small_systems, tmp_path):
    """A mixed-precision step is a whole inner solve: with the pipeline's ``check_every: 5``
    the task still stops at the first step whose residual meets the tolerance, not up to
    four solves later at the next multiple of 5."""
    from rqml_dask.problem import load_problem
    from rqml_dask.refinement import Refinement

    config = systems_dict(small_systems, tmp_path / "out.zarr", models={"ladder": ["mixed_precision"]})
    assert config["convergence"]["check_every"] == 5
    task = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config)).tasks()[0]
    task, problem = load_problem(task, numpy_backend())
    alone = MixedPrecisionRefinement(problem, numpy_backend())
    needed = next(n for n in range(1, 20) if (alone.step(), alone.misfit())[1] <= 1e-10)
    refinement = Refinement.start(task, problem, numpy_backend())
    refinement.run_to_end()
    assert refinement.status == "converged" and refinement.iteration == needed < 5
    assert len(refinement.trace) == needed  # one check per step


@pytest.mark.parametrize("name", ["jacobi", "conjugate_gradient", "mixed_precision"])
def test_each_rung_runs_under_the_strict_array_api_and_resumes_exactly(name, small_systems):
    """What would break on CuPy (NumPy-only calls, implicit casts) breaks here, without a GPU.
    The mixed-precision rung's spectral preconditioner transforms in float32 by SciPy's sine
    transforms on NumPy and by NumPy's FFT of the mirrored grid (in float64, then rounded)
    under the strict namespace: their iterates agree to float32's rounding, amplified by a
    few CG steps, not bit for bit."""
    import array_api_strict

    from rqml_dask.arrays import ArrayBackend
    from rqml_dask.models import load_model

    strict = ArrayBackend(xp=array_api_strict, name="array_api_strict")
    rhs, coefficients, _ = systems(small_systems, slice(0, 2))
    cls = load_model(name)
    on_numpy = cls({"image": rhs, "coefficients": coefficients}, numpy_backend())
    problem = {"image": strict.asarray(rhs), "coefficients": strict.asarray(coefficients)}
    on_strict = cls(problem, strict)
    for _ in range(3):
        on_numpy.step()
        on_strict.step()
    got = strict.to_numpy(on_strict.estimate)
    assert got.dtype == np.float64
    atol = (1e-5 if name == "mixed_precision" else 1e-9) * np.abs(on_numpy.estimate).max()
    np.testing.assert_allclose(got, on_numpy.estimate, rtol=1e-6, atol=atol)
    assert on_strict.misfit() == pytest.approx(on_numpy.misfit(), rel=1e-5)
    resumed = cls(problem, strict)
    resumed.restore(on_strict.state())
    on_strict.step()
    resumed.step()
    np.testing.assert_array_equal(strict.to_numpy(resumed.estimate), strict.to_numpy(on_strict.estimate))


def test_a_rung_too_slow_for_its_budget_escalates_at_its_first_window_and_the_last_rung_is_never_cut(small_systems, tmp_path):
    """Jacobi on these systems improves by more than ``min_progress`` per window, but at a
    rate that would reach 1e-10 only after thousands of iterations: with a per-model budget
    of 1,000 it escalates at its first full window (iteration 15: the first check with 10
    iterations of history, the shipped pipeline's window), not later, as when only novelty
    judged it. On a ladder of Jacobi alone the same rate is no stall at the first window:
    the last rung is only cut by novelty or its budget, and the task runs past iteration 15."""
    from rqml_dask.problem import load_problem
    from rqml_dask.refinement import Refinement

    def first_run(ladder: list[str], budget: int) -> tuple[int, str]:
        config = systems_dict(small_systems, tmp_path / "out.zarr", models={"ladder": ladder})
        config["convergence"]["max_iterations_per_model"] = budget
        config["convergence"]["max_iterations"] = budget
        task = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config)).tasks()[0]
        task, problem = load_problem(task, numpy_backend())
        refinement = Refinement.start(task, problem, numpy_backend())
        while refinement.model_name == ladder[0] and not refinement.done:
            refinement.step()
        return refinement.runs[0].iterations, refinement.runs[0].stop

    assert first_run(["jacobi", "conjugate_gradient", "mixed_precision"], 1000) == (15, "stalled")
    iterations, stop = first_run(["jacobi"], 1000)
    assert iterations > 15 and stop in ("stalled", "max_iterations")
