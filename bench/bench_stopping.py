"""The stopping rule against the oracle: plain Richardson-Lucy's best error at any iteration.

For each data set (``rqml data synth``: cells, a Gaussian or a widefield PSF, several photon
levels) the pipeline runs with ``pipelines/quickstart.yaml``'s settings on the embedded
cluster, and the oracle refines every task's window (read as the pipeline reads it) with
plain RL, scoring the stitched cores against the truth after every iteration: its best
volume-wide error and the iteration it is reached at (the same count for every task).

    .venv/bin/python bench/bench_stopping.py [--shape 48,96,96] [--tile 24,48,48]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from distributed import Client

from rqml_dask.arrays import numpy_backend
from rqml_dask.cluster import embedded_cluster
from rqml_dask.pipeline import Pipeline, load_pipeline_config
from rqml_dask.pipeline.config import ClusterSpec
from rqml_dask.synthetic import SynthSpec, write_synthetic
from rqml_dask.volumes import read_core, read_window, open_array
from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy


def oracle(pipeline: Pipeline, iterations: int) -> tuple[float, int]:
    """Plain RL's best volume-wide relative error over ``iterations`` and where."""
    backend = numpy_backend()
    tasks = pipeline.tasks()
    psf = np.asarray(open_array(tasks[0].input.operator)[...], dtype=np.float32)
    sse = np.zeros(iterations)
    truth_ss = 0.0
    for task in tasks:
        truth = read_core(task.input.truth, task.region, np.float64)
        truth_ss += float(np.sum(truth**2))
        model = RichardsonLucy({"image": read_window(task.input.image, task.region), "psf": psf}, backend)
        for k in range(iterations):
            model.step()
            sse[k] += float(np.sum((model.estimate[task.region.core_in_window].astype(np.float64) - truth) ** 2))
    errors = np.sqrt(sse / truth_ss)
    return float(errors.min()), int(errors.argmin()) + 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="48,96,96")
    parser.add_argument("--tile", default="24,48,48")
    parser.add_argument("--photons", default="1000,100,30")
    parser.add_argument("--oracle-iterations", type=int, default=150)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    tile = tuple(int(v) for v in args.tile.split(","))
    root = Path(tempfile.mkdtemp(prefix="rqml-stopping-"))
    quickstart = load_pipeline_config("pipelines/quickstart.yaml")
    print("| PSF | photons | observed error | pipeline error | oracle best (iteration) | pipeline / oracle "
          "| iterations: pipeline / oracle | states | held-out deviance input -> result |")
    print("|---|---|---|---|---|---|---|---|---|")
    with embedded_cluster(ClusterSpec(n_workers=2, dashboard_address="127.0.0.1:0")) as cluster, Client(cluster) as client:
        for psf in ("gaussian", "widefield"):
            for photons in (float(p) for p in args.photons.split(",")):
                name = f"{psf}-{photons:g}"
                store = write_synthetic(root / f"{name}.zarr", SynthSpec(shape=shape, psf=psf, photons=photons, seed=11))
                config = quickstart.model_copy(update={
                    "name": name,
                    "input": quickstart.input.model_copy(update={"store": store, "synthesize": None}),
                    "output": quickstart.output.model_copy(update={"store": root / f"{name}.out.zarr"}),
                    "tiling": quickstart.tiling.model_copy(update={"tile": tile}),
                })
                pipeline = Pipeline(config)
                report = pipeline.run(client, progress=False)
                best, at = oracle(pipeline, args.oracle_iterations)
                states: dict[str, int] = {}
                for o in report.outcomes:
                    states[o.state] = states.get(o.state, 0) + 1
                held = [o.held_out for o in report.outcomes if o.held_out is not None]
                deviance = (f"{np.mean([h.input for h in held]):.3f} -> {np.mean([h.result for h in held]):.3f}"
                            if held else "-")
                print(f"| {psf} | {photons:g} | {report.input_error:.3f} | {report.output_error:.3f} | {best:.3f} ({at}) "
                      f"| {report.output_error / best:.2f} | {report.iterations / (at * len(report.outcomes)):.2f} "
                      f"| {', '.join(f'{n} {s}' for s, n in sorted(states.items()))} | {deviance} |", flush=True)


if __name__ == "__main__":
    main()
