"""The engine's fixed cost per task at 1,000+ tasks, against Dask's own, on one cluster, in one run.

A volume cut into ``--tasks`` tiny tiles, each refined for ``--iterations`` Richardson-Lucy
iterations (a trivial model: the iterations cost little, so what is measured is what the
engine adds per task), on ``--nodes`` in-process nodes (``LocalCluster(processes=False)``
with the node and scheduler plugins preloaded, as ``rqml run`` loads them). Three figures,
each the best of ``--repeats`` interleaved runs:

- ``dask``: ``client.map`` of the same tile function a user would write (read the window,
  the same iterations with the same kernel, write the core): Dask's own cost per task for
  the same work;
- ``engine``: ``Pipeline.run`` of the same tiles (checkpoints, done markers, the scheduler
  plugin's placement, the result check, the vote-free report: everything a run does);
- ``noop``: ``client.map`` of a function that does nothing: Dask's floor per task.

Usage: python bench/bench_many_tasks.py [--tasks 1000] [--nodes 50] [--iterations 2] [--repeats 2]
Last line: ``tasks=<n> nodes=<m> dask_ms_per_task=<x> engine_ms_per_task=<y> ratio=<y/x>``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from distributed import Client, LocalCluster, wait

from bench_pipeline import baseline_tile
from rqml_dask import Pipeline
from rqml_dask.deploy.local import PRELOADS, SCHEDULER_PRELOADS
from rqml_dask.pipeline import load_pipeline_config
from rqml_dask.synthetic import SynthSpec, write_synthetic

TILE = (8, 16, 16)


def grid_for(tasks: int) -> tuple[int, int, int]:
    """Tiles per axis (z, y, x) giving at least ``tasks`` tiles, as even as possible."""
    side = math.ceil(tasks ** (1 / 3))
    z = math.ceil(tasks / side**2)
    return z, side, side


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="rqml-many-"))
    shape = tuple(n * t for n, t in zip(grid_for(args.tasks), TILE))
    store = write_synthetic(tmp / "in.zarr", SynthSpec(kind="cells", shape=shape, psf_sigma=(1.0, 1.0, 1.0), seed=3))
    quickstart = load_pipeline_config("pipelines/quickstart.yaml")
    fixed = {"max_iterations": args.iterations, "check_every": 1, "stability_tol": 0.0, "consistency_tol": 0.0,
             "novelty_window": 10**6, "held_out_fraction": 0.0, "accept_max_iterations": True}
    runs = itertools.count()

    def pipeline() -> Pipeline:
        name = f"many-{next(runs)}"  # a fresh output and checkpoints each run: nothing is reused
        return Pipeline(quickstart.model_copy(update={
            "name": name,
            "input": quickstart.input.model_copy(update={"store": store, "synthesize": None}),
            "output": quickstart.output.model_copy(update={"store": tmp / f"{name}.zarr"}),
            "tiling": quickstart.tiling.model_copy(update={"tile": TILE}),
            "models": quickstart.models.model_copy(update={"ladder": ("richardson_lucy",)}),
            "convergence": replace(quickstart.convergence, **fixed),
            "checkpoint": quickstart.checkpoint.model_copy(update={"artifacts": tmp / f"{name}.checkpoints"}),
        }))

    def run_engine() -> float:
        p = pipeline()
        start = time.perf_counter()
        report = p.run(client, progress=False)
        seconds = time.perf_counter() - start
        assert not report.rejected and len(report.outcomes) == n_tasks, report.summary()
        return seconds

    def run_dask() -> float:
        p = pipeline()
        tasks = p.tasks()
        start = time.perf_counter()
        p.create_output(tasks)  # the engine's time includes creating its output too
        futures = client.map(baseline_tile, [str(store)] * len(tasks), [str(p.output_ref.store)] * len(tasks),
                             [t.region.core for t in tasks], [t.region.window for t in tasks],
                             [args.iterations] * len(tasks), pure=False)
        wait(futures)
        seconds = time.perf_counter() - start
        assert sum(client.gather(futures)) == args.iterations * len(tasks)
        return seconds

    def run_noop() -> float:
        start = time.perf_counter()
        wait(client.map(lambda i: i, range(n_tasks), pure=False))
        return time.perf_counter() - start

    with LocalCluster(n_workers=args.nodes, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", preload=PRELOADS, scheduler_kwargs={"preload": SCHEDULER_PRELOADS},
                      memory_limit=None) as cluster, Client(cluster) as client:
        n_tasks = len(pipeline().tasks())
        print(f"volume {shape}, {n_tasks} tiles of {TILE}, {args.nodes} in-process nodes, {args.iterations} RL iterations each")
        run_dask(), run_engine()  # warm imports, plugins and stores before anything is timed
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, run in (("dask", run_dask), ("engine", run_engine), ("noop", run_noop)):
                seconds = run()
                best[name] = min(seconds, best.get(name, math.inf))
                print(f"  {name:<7}{seconds:8.2f} s  {1000 * seconds / n_tasks:7.2f} ms/task")
    per_task = {name: 1000 * seconds / n_tasks for name, seconds in best.items()}
    print(f"noop client.map: {per_task['noop']:.2f} ms/task (Dask's floor)")
    print(f"tasks={n_tasks} nodes={args.nodes} dask_ms_per_task={per_task['dask']:.2f} "
          f"engine_ms_per_task={per_task['engine']:.2f} ratio={per_task['engine'] / per_task['dask']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
