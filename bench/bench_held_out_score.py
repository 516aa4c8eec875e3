"""Which held-out score chooses the iterate (issue 32): the deviance of the prediction or the
object error, for plain and accelerated RL, against the truth.

For every task of a scene (the quickstart's volume and tiles; synthetic cells with
``--cells``), in one process: each model refines the task's training counts (the held-out
split the engine makes, :func:`rqml_dask.problem.load_problem`) and, alongside, all of its
counts, for ``--iterations`` iterations; after every iteration the training estimate's
prediction is scored against the held-out counts by both scores, and both estimates' core
error against the truth is recorded. The rule is then replayed on those traces as the
engine applies it (a check every ``check_every`` iterations, stop ``held_out_patience``
iterations past the best, the result the all-counts estimate at the chosen iteration: the
refit), for each score, and reported as the scene's relative error against the truth and
the iterations it costs a task (to the stop, plus the refit's). ``best`` is the all-counts
trace's lowest error (the truth's choice, capped at ``--iterations``).

Usage: python bench/bench_held_out_score.py [--iterations 120] [--cells 64,256,256:32,128,128:100,1000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from rqml_dask.arrays import numpy_backend
from rqml_dask.held_out import HeldOutScore
from rqml_dask.pipeline import Pipeline, load_pipeline_config
from rqml_dask.problem import load_problem
from rqml_dask.synthetic import SynthSpec, write_synthetic
from rqml_dask.volumes import read_core
from rqml_plugins.deconvolution.richardson_lucy import AcceleratedRichardsonLucy, RichardsonLucy

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"richardson_lucy": RichardsonLucy, "richardson_lucy_accelerated": AcceleratedRichardsonLucy}


def traces(pipeline: Pipeline, iterations: int) -> tuple[dict[str, list[np.ndarray]], float]:
    """Per model, per task: rows deviance, object error, all-counts core SSE, each per
    iteration; and the truth's sum of squares over every core."""
    backend = numpy_backend()
    found: dict[str, list[np.ndarray]] = {name: [] for name in MODELS}
    truth_energy = 0.0
    for task in pipeline.tasks():
        task, problem = load_problem(task, backend)
        core = task.region.core_in_window
        truth = read_core(task.input.truth, task.region, np.float64)
        truth_energy += float(np.sum(truth**2))
        score = HeldOutScore(problem["held_out"], task.input.counts_per_unit, task.convergence.held_out_fraction,
                             backend, core)
        for name, cls in MODELS.items():
            train = cls({"image": problem["image"], "psf": problem["psf"]}, backend)
            full = cls({"image": problem["observed"], "psf": problem["psf"]}, backend)
            weights = train.object_weights(tuple(score.held.shape))
            rows = np.empty((3, iterations))
            for i in range(iterations):
                train.step()
                full.step()
                prediction = train.prediction()
                rows[0, i] = score.deviance(prediction)
                rows[1, i] = score.object_error(prediction, weights)
                rows[2, i] = float(np.sum((np.asarray(full.estimate[core], np.float64) - truth) ** 2))
            found[name].append(rows)
    return found, truth_energy


def replay(rows: np.ndarray, score: int, every: int, patience: int) -> tuple[int, int]:
    """The iteration the rule chooses on one task's trace by score row ``score``, and the
    iteration it stops at."""
    best, chosen = np.inf, 0
    for iteration in range(every, rows.shape[1] + 1, every):
        if rows[score, iteration - 1] < best:
            best, chosen = rows[score, iteration - 1], iteration
        if iteration - chosen >= patience:
            return chosen, iteration
    return chosen, rows.shape[1]


def report(title: str, pipeline: Pipeline, iterations: int, patiences: list[int]) -> None:
    every = pipeline.config.convergence.check_every
    found, truth_energy = traces(pipeline, iterations)
    print(f"\n{title}: {len(pipeline.tasks())} tasks, a check every {every}, {iterations} iterations traced")
    print(f"{'model':<30}{'score':<10}{'patience':>9}{'error':>8}{'iterations/task':>17}   chosen (per task)")
    for name, tasks in found.items():
        best = sum(float(rows[2].min()) for rows in tasks)
        for label, row in (("deviance", 0), ("object", 1)):
            for patience in patiences:
                sse, cost, chosen = 0.0, 0, []
                for rows in tasks:
                    at, stop = replay(rows, row, every, patience)
                    sse += rows[2, at - 1]
                    cost += stop + at
                    chosen.append(at)
                print(f"{name:<30}{label:<10}{patience:9}{(sse / truth_energy) ** 0.5:8.4f}{cost / len(tasks):17.1f}   {chosen}")
        print(f"{name:<30}{'best':<10}{'':9}{(best / truth_energy) ** 0.5:8.4f}"
              f"{'':17}   {[int(rows[2].argmin()) + 1 for rows in tasks]}")


def on(store: Path, tile: tuple[int, ...]) -> Pipeline:
    config = load_pipeline_config(ROOT / "pipelines" / "quickstart.yaml")
    return Pipeline(config.model_copy(update={
        "input": config.input.model_copy(update={"store": store, "synthesize": None}),
        "tiling": config.tiling.model_copy(update={"tile": list(tile)}),
    }))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--patience", default="10,5", help="held_out_patience values to replay")
    parser.add_argument("--quickstart", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cells", default="", help="PSF:SHAPE:TILE:PHOTONS,... synthetic cells scenes too, ';' "
                                                    "between them (e.g. gaussian:64,256,256:32,128,128:100,1000)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="rqml-score-"))
    quickstart = load_pipeline_config(ROOT / "pipelines" / "quickstart.yaml")
    patiences = [int(v) for v in args.patience.split(",")]
    if args.quickstart:
        store = write_synthetic(tmp / "quickstart.zarr", quickstart.input.synthesize)
        report("quickstart volume", on(store, tuple(quickstart.tiling.tile)), args.iterations, patiences)
    for scene in filter(None, args.cells.split(";")):
        psf, shape, tile, photons = scene.split(":")
        for p in photons.split(","):
            store = write_synthetic(tmp / f"cells-{psf}-{p}.zarr", SynthSpec(
                kind="cells", shape=tuple(int(v) for v in shape.split(",")), psf=psf, photons=float(p), seed=11))
            report(f"cells, {psf} PSF, {p} photons, tiles {tile}", on(store, tuple(int(v) for v in tile.split(","))),
                   args.iterations, patiences)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
