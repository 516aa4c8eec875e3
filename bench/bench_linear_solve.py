"""linear_solve against SciPy: per CG iteration, and a whole pipeline against ``client.map`` of ``cg``.

1. Per iteration, one process, same matrix: the ``conjugate_gradient`` model (matrix-free,
   float32 vectors, Jacobi preconditioner) stepping one system, against
   ``scipy.sparse.linalg.cg`` (CSR matrix, float64, the same preconditioner) run for exactly
   N iterations (``rtol=0``): seconds per iteration and the ratio.
2. Whole runs on the cluster ``rqml run`` starts (``embedded_cluster``), one after the
   other: the pipeline (``pipelines/linear_solve.yaml``'s settings: the Jacobi -> CG ->
   mixed-precision ladder, checkpoints, validation; two systems per task) and the same with
   the mixed-precision rung alone (checked after every step, its own cadence), against
   what a user writes by hand: ``client.map`` of a function that reads two systems
   (one output chunk) from Zarr, and for each assembles its CSR matrix and runs SciPy's
   Jacobi-preconditioned ``cg`` to the same tolerance (``rtol`` = the pipeline's
   ``target_misfit``), then writes them; and the same with the mixed-precision rung's own
   spectral preconditioner, in float64 (:func:`spectral_preconditioner`: like with like).
   Wall time, iterations (refinement steps for the
   mixed-precision rung, CG iterations for SciPy) and the worst true relative residual.

Usage: python bench/bench_linear_solve.py [--grid 128,128] [--count 16] [--contrast 1000] [--workers 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import zarr
from distributed import Client, wait

from rqml_dask import Pipeline
from rqml_dask.arrays import numpy_backend
from rqml_dask.deploy.local import embedded_cluster
from rqml_dask.pipeline import load_pipeline_config
from rqml_dask.pipeline.config import ClusterSpec
from rqml_dask.synthetic import SystemsSpec, diffusion_matrix, write_systems
from rqml_plugins.linear_solve.conjugate_gradient import ConjugateGradient


def jacobi_preconditioner(matrix: scipy.sparse.csr_matrix) -> scipy.sparse.dia_matrix:
    return scipy.sparse.diags(1.0 / matrix.diagonal())


def spectral_preconditioner(matrix: scipy.sparse.csr_matrix, coefficients: np.ndarray) -> scipy.sparse.linalg.LinearOperator:
    """The mixed-precision rung's preconditioner (``SpectralPreconditioner``) as a user who
    knows it writes it for SciPy: float64, SciPy's type-II sine transforms (which
    diagonalise the same constant-coefficient operator the rung inverts by real FFTs of its
    antisymmetric extension)."""
    import scipy.fft

    grid = coefficients.shape[1:]
    scale = [float(np.exp(np.mean(np.log(k)))) for k in coefficients]
    eigenvalues = sum((c * (2 - 2 * np.cos(np.pi * np.arange(1, n + 1) / n))).reshape([n if a == axis else 1 for a in range(len(grid))])
                      for axis, (c, n) in enumerate(zip(scale, grid)))
    inverse_root = 1 / np.sqrt(matrix.diagonal().reshape(grid) / (2 * sum(scale)))

    def apply(r: np.ndarray) -> np.ndarray:
        spectrum = scipy.fft.dstn(inverse_root * r.reshape(grid), type=2, norm="ortho")
        return (inverse_root * scipy.fft.idstn(spectrum / eigenvalues, type=2, norm="ortho")).ravel()

    return scipy.sparse.linalg.LinearOperator(matrix.shape, apply)


def baseline_solve(store: str, out: str, block: tuple[int, int], rtol: float, preconditioner: str = "jacobi") -> int:
    """A user's function: read a block of systems (one output chunk, as a pipeline task
    holds), assemble each, SciPy's preconditioned CG (``jacobi`` or ``spectral``), write
    the block."""
    group = zarr.open_group(store, mode="r")
    rhs, coefficients = group["rhs"][block[0]:block[1]], group["coefficients"][block[0]:block[1]]
    solutions, iterations = np.empty_like(rhs), itertools.count()
    for i in range(len(rhs)):
        matrix = diffusion_matrix(coefficients[i])
        solution, _ = scipy.sparse.linalg.cg(matrix, rhs[i].ravel(), rtol=rtol, atol=0.0, maxiter=100_000,
                                             M=jacobi_preconditioner(matrix) if preconditioner == "jacobi"
                                             else spectral_preconditioner(matrix, coefficients[i]),
                                             callback=lambda _: next(iterations))
        solutions[i] = solution.reshape(rhs.shape[1:])
    zarr.open_group(out, mode="r+")["solution"][block[0]:block[1]] = solutions
    return next(iterations)


def worst_residual(store: Path, out: Path) -> float:
    group, result = zarr.open_group(store, mode="r"), zarr.open_group(out, mode="r")["solution"]
    worst = 0.0
    for i in range(group["rhs"].shape[0]):
        b = group["rhs"][i].ravel()
        worst = max(worst, float(np.linalg.norm(b - diffusion_matrix(group["coefficients"][i]) @ result[i].ravel()) / np.linalg.norm(b)))
    return worst


def per_iteration(store: Path, iterations: int) -> None:
    group = zarr.open_group(store, mode="r")
    rhs, coefficients = group["rhs"][0:1], group["coefficients"][0:1]
    matrix = diffusion_matrix(coefficients[0])
    preconditioner = jacobi_preconditioner(matrix)
    best = {"scipy": np.inf, "ours": np.inf}
    for _ in range(3):
        start = time.perf_counter()
        scipy.sparse.linalg.cg(matrix, rhs[0].ravel(), rtol=0.0, atol=0.0, maxiter=iterations, M=preconditioner)
        best["scipy"] = min(best["scipy"], (time.perf_counter() - start) / iterations)
        model = ConjugateGradient({"image": rhs, "coefficients": coefficients}, numpy_backend())
        start = time.perf_counter()
        for _ in range(iterations):
            model.step()
        best["ours"] = min(best["ours"], (time.perf_counter() - start) / iterations)
    print(f"per iteration, one {rhs.shape[1:]} system ({matrix.shape[0]} unknowns, {matrix.nnz} non-zeros), "
          f"{iterations} iterations, best of 3:")
    print(f"  scipy.sparse.linalg.cg (CSR, float64, Jacobi)   {best['scipy'] * 1e3:8.3f} ms")
    print(f"  conjugate_gradient (matrix-free, float32, Jacobi) {best['ours'] * 1e3:8.3f} ms")
    print(f"  scipy / ours = {best['scipy'] / best['ours']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="128,128")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--contrast", type=float, default=1000.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=200, help="for the per-iteration comparison")
    parser.add_argument("--rounds", type=int, default=2, help="whole runs, interleaved; the best wall time of each kept")
    args = parser.parse_args(argv)
    grid = tuple(int(v) for v in args.grid.split(","))

    tmp = Path(tempfile.mkdtemp(prefix="rqml-bench-"))
    store = write_systems(tmp / "in.zarr", SystemsSpec(kind="systems", grid=grid, count=args.count, contrast=args.contrast,
                                                        anisotropy=4, seed=3))
    per_iteration(store, args.iterations)

    shipped = load_pipeline_config("pipelines/linear_solve.yaml")
    tolerance = shipped.convergence.target_misfit
    runs = itertools.count()

    def pipeline(ladder: list[str]) -> Pipeline:
        name = f"solve-{next(runs)}"  # a fresh output and fresh checkpoints: nothing reused
        return Pipeline(shipped.model_copy(update={
            "name": name,
            "input": shipped.input.model_copy(update={"store": store, "synthesize": None}),
            "output": shipped.output.model_copy(update={"store": tmp / f"{name}.zarr"}),
            "tiling": shipped.tiling.model_copy(update={"tile": (2, *grid)}),
            "models": shipped.models.model_copy(update={"ladder": ladder}),
            "checkpoint": shipped.checkpoint.model_copy(update={"artifacts": tmp / f"{name}.checkpoints"}),
        }))

    spec = ClusterSpec(n_workers=args.workers, dashboard_address="127.0.0.1:0")
    with embedded_cluster(spec) as cluster, Client(cluster) as client:
        rows = {}

        def run_baseline(preconditioner: str = "jacobi") -> tuple[float, int, float]:
            p = pipeline(["mixed_precision"])
            p.create_output(p.tasks())
            out = p.output_ref.store
            start = time.perf_counter()
            blocks = [(i, min(i + 2, args.count)) for i in range(0, args.count, 2)]
            futures = client.map(baseline_solve, [str(store)] * len(blocks), [out] * len(blocks), blocks,
                                 [tolerance] * len(blocks), [preconditioner] * len(blocks), pure=False)
            wait(futures)
            seconds = time.perf_counter() - start
            return seconds, sum(client.gather(futures)), worst_residual(store, Path(out))

        def run_pipeline(ladder: list[str]) -> tuple[float, int, float]:
            p = pipeline(ladder)
            start = time.perf_counter()
            report = p.run(client, progress=False)
            seconds = time.perf_counter() - start
            assert not report.rejected, report.summary()
            return seconds, report.iterations, worst_residual(store, Path(p.output_ref.store))

        run_baseline()  # warm the workers' imports before anything is timed
        for _ in range(args.rounds):  # interleaved, best wall time kept
            for name, run in (("client.map of scipy cg", run_baseline),
                              ("... spectral preconditioner", lambda: run_baseline("spectral")),
                              ("pipeline, full ladder", lambda: run_pipeline(list(shipped.models.ladder))),
                              ("pipeline, mixed precision", lambda: run_pipeline(["mixed_precision"]))):
                result = run()
                if name not in rows or result[0] < rows[name][0]:
                    rows[name] = result
        print(f"\n{args.count} systems on {grid}, contrast {args.contrast:g}, anisotropy 4, {args.workers} workers x 1 thread, "
              f"tolerance {tolerance:g} (best of {args.rounds}):")
        print(f"{'run':<30}{'wall s':>9}{'iterations':>12}{'worst residual':>16}{'/ baseline':>12}")
        base = rows["client.map of scipy cg"][0]
        for name, (seconds, iterations, residual) in rows.items():
            print(f"{name:<30}{seconds:>9.2f}{iterations:>12}{residual:>16.2e}{seconds / base:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
