"""Time to result (issue 32): ``rqml run``'s engine against a Dask ``map_overlap`` of
scikit-image's Richardson-Lucy, on the same tiles, in one run, with errors against the truth.

For each scene (synthetic cells; the quickstart's own volume too), in one process:

* ``engine SCORE LADDER``: the quickstart pipeline (its stopping rule, guard, refit and
  checkpoints) on the embedded cluster ``rqml run`` starts, with each ladder, held-out
  score and patience given (``--ladders``, ``SCORE,PATIENCE:LADDER``; by default the
  quickstart file's own — plain RL first, the deviance, patience 10 — then accelerated RL
  first, scored by the object error, patience 5): wall time from submission to the output
  marked, and the iterations the run reports (a refit's replay is not counted);
* ``map_overlap skimage N``: ``dask.array.map_overlap`` of
  ``skimage.restoration.richardson_lucy`` at N iterations (``--fixed``, 30 by default: a
  typical pick), over chunks of the tile's size with the same halo (mirrored at the border:
  ``boundary="reflect"``), on Dask's threaded scheduler with one thread per core the
  cluster has, read from and written to Zarr.

Every run starts from nothing reused (a fresh output and checkpoint directory); runs are
interleaved ``--repeats`` times and the best wall time kept. Usage::

    python bench/bench_time_to_result.py [--photons 100,1000] [--shape 64,256,256] [--tile 32,128,128]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr
from distributed import Client

from rqml_dask import Pipeline
from rqml_dask.deploy.local import embedded_cluster
from rqml_dask.pipeline import load_pipeline_config
from rqml_dask.pipeline.config import ClusterSpec
from rqml_dask.synthetic import SynthSpec, write_synthetic

ROOT = Path(__file__).resolve().parents[1]


def relative_error(result: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(((result - truth) ** 2).sum() / (truth**2).sum()))


def map_overlap_skimage(store: Path, out: Path, tile: tuple[int, ...], halo: tuple[int, ...], iterations: int,
                        threads: int) -> None:
    """What a Dask user writes: scikit-image's RL on every chunk, with a halo, threaded."""
    from skimage.restoration import richardson_lucy

    group = zarr.open_group(store, mode="r")
    psf = np.asarray(group["psf"][...], np.float32)
    image = da.from_zarr(group["observed"]).rechunk(tile).astype(np.float32)
    scale = float(image.max().compute(scheduler="threads", num_workers=threads)) or 1.0  # skimage clips to [-1, 1]
    result = image.map_overlap(lambda block: richardson_lucy(block / scale, psf, num_iter=iterations, clip=False) * scale,
                               depth=halo, boundary="reflect", dtype=np.float32)
    with dask.config.set(scheduler="threads", num_workers=threads):
        da.to_zarr(result, str(out), overwrite=True)


def engine_settings(entry: str, quickstart) -> tuple[str, int, tuple[str, ...]]:
    """``SCORE,PATIENCE:LADDER`` (or ``quickstart``: the file's own) as the held-out score,
    the patience and the ladder."""
    if entry == "quickstart":
        settings = quickstart.convergence
        return settings.held_out_score, settings.held_out_patience, tuple(quickstart.models.ladder)
    head, _, ladder = entry.partition(":")
    score, _, patience = head.partition(",")
    return score, int(patience), tuple(ladder.split("+"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photons", default="100,1000", help="photon levels of the cells scene")
    parser.add_argument("--shape", default="64,256,256")
    parser.add_argument("--tile", default="32,128,128")
    parser.add_argument("--quickstart", action=argparse.BooleanOptionalAction, default=True,
                        help="also the quickstart's own volume and tiles")
    parser.add_argument("--ladders", default="quickstart;object,5:richardson_lucy_accelerated+richardson_lucy_tv",
                        help="SCORE,PATIENCE:LADDER to run (convergence.held_out_score and held_out_patience, then "
                             "the models), ';' between them, '+' between models; 'quickstart' for the file's own")
    parser.add_argument("--fixed", default="30", help="map_overlap iteration counts")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    fixed = [int(n) for n in args.fixed.split(",")]
    quickstart = load_pipeline_config(ROOT / "pipelines" / "quickstart.yaml")
    ladders = [engine_settings(entry, quickstart) for entry in args.ladders.split(";")]
    tmp = Path(tempfile.mkdtemp(prefix="rqml-ttr-"))
    scenes = [(f"cells {p} photons", SynthSpec(kind="cells", shape=tuple(int(v) for v in args.shape.split(",")),
                                               photons=float(p), seed=11), tuple(int(v) for v in args.tile.split(",")))
              for p in args.photons.split(",")]
    if args.quickstart:
        scenes.append(("quickstart volume", quickstart.input.synthesize, tuple(quickstart.tiling.tile)))
    runs = itertools.count()
    spec = ClusterSpec(n_workers=args.workers, threads_per_worker=1, dashboard_address="127.0.0.1:0")
    print(f"{args.workers} workers x 1 thread (map_overlap: {args.workers} threads); best of {args.repeats}; "
          f"{os.cpu_count()} cores here")
    with embedded_cluster(spec) as cluster, Client(cluster) as client:
        for title, synth, tile in scenes:
            store = write_synthetic(tmp / f"{next(runs)}.zarr", synth)
            group = zarr.open_group(store, mode="r")
            truth = group["truth"][...]
            rows: dict[str, tuple[float, int, float]] = {}

            def record(name: str, seconds: float, iterations: int, error: float) -> None:
                best = rows.get(name)
                rows[name] = (min(seconds, best[0]) if best else seconds, iterations, error)

            def engine(score: str, patience: int, ladder: tuple[str, ...]) -> tuple[int, ...]:
                run = next(runs)
                params = {m: p for m, p in quickstart.models.params.items() if m in ladder}
                config = quickstart.model_copy(update={
                    "name": f"ttr-{run}",
                    "input": quickstart.input.model_copy(update={"store": store, "synthesize": None}),
                    "output": quickstart.output.model_copy(update={"store": tmp / f"out-{run}.zarr"}),
                    "tiling": quickstart.tiling.model_copy(update={"tile": tile}),
                    "models": quickstart.models.model_copy(update={"ladder": list(ladder), "params": params}),
                    "convergence": dataclasses.replace(quickstart.convergence, held_out_score=score,
                                                       held_out_patience=patience),
                    "checkpoint": quickstart.checkpoint.model_copy(update={"artifacts": tmp / f"ckpt-{run}"}),
                })
                pipeline = Pipeline(config)
                started = time.perf_counter()
                report = pipeline.run(client, progress=False)
                seconds = time.perf_counter() - started
                assert all(o.accepted for o in report.outcomes), [o.state for o in report.outcomes]
                record(f"engine {score} {patience} {'+'.join(m.removeprefix('richardson_lucy_') for m in ladder)}", seconds,
                       report.iterations, report.output_error)
                # the halo of an interior tile: what the engine read around each core
                return tuple(max(c0 - w0 for task in pipeline.tasks() for (c0, _), (w0, _) in [(task.region.core[a], task.region.window[a])])
                             for a in range(truth.ndim))

            halo = None
            for _ in range(args.repeats):
                for score, patience, ladder in ladders:
                    halo = engine(score, patience, ladder)
                for n in fixed:
                    out = tmp / f"skimage-{next(runs)}.zarr"
                    started = time.perf_counter()
                    map_overlap_skimage(store, out, tile, halo, n, args.workers)
                    seconds = time.perf_counter() - started
                    record(f"map_overlap skimage {n}", seconds, n * int(np.prod([-(-s // t) for s, t in zip(truth.shape, tile)])),
                           relative_error(zarr.open_array(str(out), mode="r")[...], truth))
            print(f"\n{title}: volume {truth.shape}, tiles {tile}, halo {halo}, input error "
                  f"{relative_error(group['observed'][...].astype(np.float64), truth):.4f}")
            print(f"{'run':<44}{'wall s':>9}{'iterations':>12}{'error':>9}")
            for name, (seconds, iterations, error) in rows.items():
                print(f"{name:<44}{seconds:>9.2f}{iterations:>12}{error:>9.4f}")
            first = next(iter(rows.values()))
            overlap = rows[f"map_overlap skimage {fixed[0]}"]
            for name, (seconds, _, error) in rows.items():
                print(f"  {name}: wall {seconds / first[0]:.2f}x the first engine row and {seconds / overlap[0]:.2f}x "
                      f"map_overlap {fixed[0]}; error {error / first[2]:.3f}x and {error / overlap[2]:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
