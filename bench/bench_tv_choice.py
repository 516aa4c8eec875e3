"""A TV-RL strength chosen by the data against every fixed strength (issue 33, part 4).

For each data set (``rqml data synth`` cells, a Gaussian or a widefield PSF, several photon
levels, seed 11) the pipeline runs on the embedded cluster with ``pipelines/quickstart.yaml``'s
convergence settings (held-out counts, refit on all of them) but ``max_iterations`` 400 (the
quickstart's 200 stops plain RL short of its optimum at 1000 photons), and one ladder per column:

* ``λ = 0``: ``[richardson_lucy]``;
* ``λ = v`` for each ``v`` of TV-RL's grid: ``[richardson_lucy_tv]`` at that fixed strength
  (a user who picks a strength puts TV-RL on the ladder);
* ``auto``: ``[richardson_lucy, richardson_lucy_tv]`` with ``regularization: auto``, each
  task choosing its strength from its held-out counts (:mod:`rqml_dask.strength`).

Printed per data set: each run's error against the truth, the best fixed strength, auto's
error over the best fixed one's and over λ = 0's, the strengths the tasks chose and the
iterations each run took.

    .venv/bin/python bench/bench_tv_choice.py [--shape 48,96,96] [--tile 24,48,48] [--photons 20,100,1000]
        [--max-iterations 400]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
from pathlib import Path

from distributed import Client

from rqml_dask.deploy.local import embedded_cluster
from rqml_dask.pipeline import Pipeline, load_pipeline_config
from rqml_dask.pipeline.config import ClusterSpec, ModelsSpec
from rqml_dask.synthetic import SynthSpec, write_synthetic
from rqml_plugins.deconvolution.richardson_lucy import TotalVariationRichardsonLucy

GRID = TotalVariationRichardsonLucy.strength_grid


def ladders() -> dict[str, ModelsSpec]:
    runs = {"0": ModelsSpec(ladder=["richardson_lucy"])}
    for strength in GRID:
        runs[f"{strength:g}"] = ModelsSpec(ladder=["richardson_lucy_tv"],
                                           params={"richardson_lucy_tv": {"regularization": strength}})
    runs["auto"] = ModelsSpec(ladder=["richardson_lucy", "richardson_lucy_tv"],
                              params={"richardson_lucy_tv": {"regularization": "auto"}})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="48,96,96")
    parser.add_argument("--tile", default="24,48,48")
    parser.add_argument("--photons", default="20,100,1000")
    parser.add_argument("--psfs", default="gaussian,widefield")
    parser.add_argument("--max-iterations", type=int, default=400,
                        help="convergence.max_iterations of every run (the quickstart's 200 cuts plain RL short at 1000 photons)")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    tile = tuple(int(v) for v in args.tile.split(","))
    root = Path(tempfile.mkdtemp(prefix="rqml-tv-choice-"))
    quickstart = load_pipeline_config("pipelines/quickstart.yaml")
    runs = ladders()
    print("| PSF | photons | " + " | ".join(f"error λ = {name}" for name in runs) +
          " | best fixed | auto / best fixed | auto / λ = 0 | strengths chosen | iterations " +
          " / ".join(runs) + " |")
    print("|---" * (len(runs) + 7) + "|")
    with embedded_cluster(ClusterSpec(n_workers=2, dashboard_address="127.0.0.1:0")) as cluster, Client(cluster) as client:
        for psf, photons in itertools.product(args.psfs.split(","), (float(p) for p in args.photons.split(","))):
            name = f"cells-{psf}-{photons:g}"
            store = write_synthetic(root / f"{name}.zarr", SynthSpec(kind="cells", shape=shape, psf=psf,
                                                                      photons=photons, seed=11))
            errors, iterations, chosen = {}, {}, []
            for label, models in runs.items():
                config = quickstart.model_copy(update={
                    "name": f"{name}-{label}".replace(".", "p"),
                    "input": quickstart.input.model_copy(update={"store": store, "synthesize": None}),
                    "output": quickstart.output.model_copy(update={"store": root / f"{name}-{label}.out.zarr"}),
                    "tiling": quickstart.tiling.model_copy(update={"tile": tile}),
                    "models": models,
                    "convergence": dataclasses.replace(quickstart.convergence, max_iterations=args.max_iterations),
                })
                report = Pipeline(config).run(client, progress=False)
                if report.rejected:
                    why = report.rejected[0]
                    print(f"  ({label}: {len(report.rejected)} of {len(report.outcomes)} not accepted; {why.task_id}: "
                          f"{why.state}, {why.reason or '; '.join(why.validation_failures)})")
                errors[label], iterations[label] = report.output_error, report.iterations
                if label == "auto":
                    chosen = sorted((o.held_out.strength for o in report.outcomes), key=lambda s: -1 if s is None else s)
            fixed = {label: error for label, error in errors.items() if label != "auto"}
            best = min(fixed, key=fixed.get)
            print(f"| {psf} | {photons:g} | " + " | ".join(f"{errors[label]:.4f}" for label in runs) +
                  f" | {best} | {errors['auto'] / fixed[best]:.4f} | {errors['auto'] / errors['0']:.4f} | "
                  f"{', '.join('-' if s is None else f'{s:g}' for s in chosen)} | " + " / ".join(str(iterations[label]) for label in runs) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
