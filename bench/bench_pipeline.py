"""The pipeline engine against the hand-written Dask baseline, on one cluster, in one run.

Both run on the cluster ``rqml run`` starts (``embedded_cluster``), one after the other.
Baseline: what a user writes today: ``client.map`` of a function that reads a tile's
window from Zarr (mirrored at the border, as the engine does), runs a fixed number of
Richardson-Lucy iterations with the same kernel, and writes the tile's core.

Two comparisons:

1. engine overhead: the engine with every tile run for exactly N iterations (convergence
   checks and checkpoints every 10 iterations still on, so their cost counts) vs the
   baseline at N iterations: wall-time ratio;
2. convergence: the engine stopping each tile on its own (the quickstart settings) vs the
   baseline at several fixed N: total iterations and error against the ground truth.

Usage: python bench/bench_pipeline.py [--shape 64,256,256] [--tile 32,64,64] [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from distributed import Client, wait

from rqml_dask import Pipeline
from rqml_dask.deploy.local import embedded_cluster
from rqml_dask.pipeline import load_pipeline_config
from rqml_dask.pipeline.config import ClusterSpec
from rqml_dask.synthetic import SynthSpec, write_synthetic


def baseline_tile(store: str, out: str, core, window, iterations: int) -> int:
    """A user's tile function: read, pad, fixed-iteration RL, write."""
    from rqml_dask.arrays import numpy_backend
    from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy

    group = zarr.open_group(store, mode="r")
    image = group["observed"]
    inside = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(window, image.shape))
    data = np.asarray(image[inside], np.float32)
    data = np.pad(data, [(s.start - a, b - s.stop) for (a, b), s in zip(window, inside)], mode="symmetric")
    model = RichardsonLucy({"image": data, "psf": np.asarray(group["psf"][...])}, numpy_backend())
    for _ in range(iterations):
        model.step()
    crop = tuple(slice(c0 - w0, c1 - w0) for (c0, c1), (w0, _) in zip(core, window))
    zarr.open_group(out, mode="r+")["deconvolved"][tuple(slice(a, b) for a, b in core)] = model.estimate[crop]
    return iterations


def relative_error(out: Path, truth: np.ndarray) -> float:
    result = zarr.open_group(out, mode="r")["deconvolved"][...]
    return float(np.sqrt(((result - truth) ** 2).sum() / (truth**2).sum()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,256,256")
    parser.add_argument("--tile", default="32,64,64")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fixed", default="40,80,160", help="baseline iteration counts")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each fixed count; best kept")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    tile = [int(v) for v in args.tile.split(",")]
    fixed = [int(v) for v in args.fixed.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="rqml-bench-"))
    store = write_synthetic(tmp / "in.zarr", SynthSpec(kind="cells", shape=shape, seed=7))
    truth = zarr.open_group(store, mode="r")["truth"][...]
    quickstart = load_pipeline_config("pipelines/quickstart.yaml")

    def pipeline(name: str, convergence: dict) -> Pipeline:
        config = quickstart.model_copy(
            update={
                "name": name,
                "input": quickstart.input.model_copy(update={"store": store, "synthesize": None}),
                "output": quickstart.output.model_copy(update={"store": tmp / f"{name}.zarr"}),
                "tiling": quickstart.tiling.model_copy(update={"tile": tuple(tile)}),
                "convergence": quickstart.convergence.__class__(**{**quickstart.convergence.__dict__, **convergence}),
            }
        )
        return Pipeline(config)

    spec = ClusterSpec(n_workers=args.workers, dashboard_address="127.0.0.1:0")
    with embedded_cluster(spec) as cluster, Client(cluster) as client:
        print(f"volume {shape}, tiles {tile}, {args.workers} workers x 1 thread")
        rows: dict[str, tuple[float, int, float]] = {}

        def record(name: str, seconds: float, iterations: int, error: float) -> None:
            best = rows.get(name)
            rows[name] = (min(seconds, best[0]) if best else seconds, iterations, error)

        runs = itertools.count()

        def run_engine(name: str, convergence: dict) -> int:
            # a fresh output (and so fresh checkpoints) each time: nothing is reused from a repeat
            p = pipeline(f"{name.replace(' ', '-')}-{next(runs)}", convergence)
            start = time.perf_counter()
            report = p.run(client, progress=False)
            record(name, time.perf_counter() - start, report.iterations, report.output_error)
            return max(o.iterations for o in report.outcomes)

        def run_baseline(n: int) -> None:
            p = pipeline(f"baseline-{n}", {})
            tasks = p.tasks()
            p.create_output(tasks)
            start = time.perf_counter()
            futures = client.map(
                baseline_tile,
                [str(store)] * len(tasks),
                [str(tmp / f"baseline-{n}.zarr")] * len(tasks),
                [t.region.core for t in tasks],
                [t.region.window for t in tasks],
                [n] * len(tasks),
                pure=False,
            )
            wait(futures)
            total = sum(client.gather(futures))
            record(f"baseline fixed {n}", time.perf_counter() - start, total, relative_error(tmp / f"baseline-{n}.zarr", truth))

        never_stop = {"stability_tol": 0.0, "consistency_tol": 0.0, "novelty_window": 10**6, "held_out_fraction": 0.0}
        run_baseline(fixed[0])  # warm the workers' imports before anything is timed
        rows.clear()
        for _ in range(args.repeats):  # interleaved, best wall time kept
            for n in fixed:
                run_baseline(n)
                run_engine(f"engine fixed {n}", {**never_stop, "max_iterations": n})
        hardest = run_engine("engine converging", {})
        run_baseline(hardest)  # the fixed count that gives every tile what its hardest one needed

        input_error = float(np.sqrt(((zarr.open_group(store, mode="r")["observed"][...] - truth) ** 2).sum() / (truth**2).sum()))
        print(f"input error vs truth (relative RMSE): {input_error:.4f}")
        print(f"{'run':<22}{'wall s':>9}{'iterations':>12}{'error':>9}")
        for name, (seconds, iterations, error) in rows.items():
            print(f"{name:<22}{seconds:>9.2f}{iterations:>12}{error:>9.4f}")
        for n in fixed:
            ratio = rows[f"engine fixed {n}"][0] / rows[f"baseline fixed {n}"][0]
            print(f"overhead at {n} iterations per tile: engine/baseline wall = {ratio:.3f}")
        converging, matched = rows["engine converging"], rows[f"baseline fixed {hardest}"]
        print(
            f"converging engine vs baseline fixed at its hardest tile's {hardest}: "
            f"iterations {converging[1]}/{matched[1]} = {converging[1] / matched[1]:.2f}, "
            f"error {converging[2]:.4f} vs {matched[2]:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
