"""The stopping rule against the oracle: plain Richardson-Lucy's best error at any iteration.

For each data set (``rqml data synth``: cells or beads, a Gaussian or a widefield PSF, several
photon levels) the pipeline runs with ``pipelines/quickstart.yaml``'s settings on the embedded
cluster, and the oracle refines the whole volume with plain RL, scoring it against the truth
after every iteration: its best error and the iteration it is reached at. Each task's verdict
is checked against the truth: a *false rejection* is a task not accepted whose core beats the
input against the truth, a *false acceptance* one accepted whose core does not.

    .venv/bin/python bench/bench_stopping.py [--shape 48,96,96] [--tile 24,48,48] [--kinds cells,beads]
        [--camera 100,2,2]   # uint16 camera data: offset (ADU), gain (ADU/photon), read noise (ADU)
        [--ladder richardson_lucy_accelerated,richardson_lucy_tv]   # another ladder than the quickstart's
        [--score object --patience 5]   # convergence.held_out_score and held_out_patience other than the quickstart's
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
from pathlib import Path

import numpy as np
from distributed import Client

from rqml_dask.arrays import numpy_backend
from rqml_dask.deploy.local import embedded_cluster
from rqml_dask.pipeline import Pipeline, load_pipeline_config
from rqml_dask.pipeline.config import CameraSpec, ClusterSpec
from rqml_dask.synthetic import SynthSpec, write_synthetic
from rqml_dask.volumes import open_array
from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy


def oracle(pipeline: Pipeline, iterations: int) -> tuple[float, int]:
    """Plain RL's best relative error on the whole volume over ``iterations``, and where."""
    task = pipeline.tasks()[0]
    psf = np.asarray(open_array(task.input.operator)[...], dtype=np.float32)
    image = np.asarray(open_array(task.input.image)[...])
    background = 0.0
    if task.input.camera is not None:
        image, background = task.input.camera.photons(image), task.input.camera.pedestal
    image = image.astype(np.float32)
    truth = np.asarray(open_array(task.input.truth)[...], dtype=np.float64)
    model = RichardsonLucy({"image": image, "psf": psf, "background": background}, numpy_backend())
    errors = []
    for _ in range(iterations):
        model.step()
        errors.append(float(np.linalg.norm(model.estimate - truth) / np.linalg.norm(truth)))
    return float(min(errors)), int(np.argmin(errors)) + 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="48,96,96")
    parser.add_argument("--tile", default="24,48,48")
    parser.add_argument("--photons", default="20,50,300,1000")
    parser.add_argument("--kinds", default="cells,beads")
    parser.add_argument("--psfs", default="gaussian,widefield")
    parser.add_argument("--camera", default=None, help="OFFSET,GAIN[,READ_NOISE]: uint16 camera data (ADU), read with input.camera given")
    parser.add_argument("--oracle-iterations", type=int, default=150)
    parser.add_argument("--ladder", default=None, help="models, comma-separated (default: the quickstart file's ladder)")
    parser.add_argument("--score", default=None, help="convergence.held_out_score (default: the quickstart file's)")
    parser.add_argument("--patience", type=int, default=None, help="convergence.held_out_patience (default: the quickstart file's)")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    tile = tuple(int(v) for v in args.tile.split(","))
    root = Path(tempfile.mkdtemp(prefix="rqml-stopping-"))
    quickstart = load_pipeline_config("pipelines/quickstart.yaml")
    if args.ladder is not None:
        ladder = args.ladder.split(",")
        quickstart = quickstart.model_copy(update={"models": quickstart.models.model_copy(update={
            "ladder": ladder, "params": {m: p for m, p in quickstart.models.params.items() if m in ladder}})})
    convergence = quickstart.convergence
    if args.score is not None:
        convergence = dataclasses.replace(convergence, held_out_score=args.score)
    if args.patience is not None:
        convergence = dataclasses.replace(convergence, held_out_patience=args.patience)
    quickstart = quickstart.model_copy(update={"convergence": convergence})
    print(f"ladder: {', '.join(quickstart.models.ladder)}; held-out score {convergence.held_out_score}, "
          f"patience {convergence.held_out_patience}")
    print("| object | PSF | photons | observed error | pipeline error | oracle best (iteration) | pipeline / oracle "
          "| iterations: pipeline / oracle | states | false rejections | false acceptances |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with embedded_cluster(ClusterSpec(n_workers=2, dashboard_address="127.0.0.1:0")) as cluster, Client(cluster) as client:
        for kind, psf, photons in itertools.product(args.kinds.split(","), args.psfs.split(","),
                                                    (float(p) for p in args.photons.split(","))):
                name = f"{kind}-{psf}-{photons:g}"
                camera = None if args.camera is None else dict(zip(("offset", "gain", "read_noise"), map(float, args.camera.split(","))))
                store = write_synthetic(root / f"{name}.zarr", SynthSpec(
                    kind=kind, shape=shape, psf=psf, photons=photons, seed=11,
                    **({} if camera is None else {"camera_offset": camera["offset"], "camera_gain": camera["gain"],
                                                  "read_noise": camera.get("read_noise", 0.0)})))
                config = quickstart.model_copy(update={
                    "name": name,
                    "input": quickstart.input.model_copy(update={
                        "store": store, "synthesize": None, "camera": None if camera is None else CameraSpec(**camera)}),
                    "output": quickstart.output.model_copy(update={"store": root / f"{name}.out.zarr"}),
                    "tiling": quickstart.tiling.model_copy(update={"tile": tile}),
                })
                pipeline = Pipeline(config)
                report = pipeline.run(client, progress=False)
                best, at = oracle(pipeline, args.oracle_iterations)
                states: dict[str, int] = {}
                for o in report.outcomes:
                    states[o.state] = states.get(o.state, 0) + 1
                beats = [o.error.output_sse < o.error.input_sse for o in report.outcomes]
                false_rejections = sum(b and not o.accepted for b, o in zip(beats, report.outcomes))
                false_acceptances = sum(o.accepted and not b for b, o in zip(beats, report.outcomes))
                print(f"| {kind} | {psf} | {photons:g} | {report.input_error:.3f} | {report.output_error:.3f} | {best:.3f} ({at}) "
                      f"| {report.output_error / best:.2f} | {report.iterations / (at * len(report.outcomes)):.2f} "
                      f"| {', '.join(f'{n} {s}' for s, n in sorted(states.items()))} | {false_rejections} "
                      f"| {false_acceptances} |", flush=True)


if __name__ == "__main__":
    main()
