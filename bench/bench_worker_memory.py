"""Worker memory across consecutive runs on one long-lived cluster (issue 30).

Starts the cluster ``rqml run`` starts (``embedded_cluster``), writes one synthetic volume,
then runs the same deconvolution pipeline ``--runs`` times on the same client. Every run
computes all its tasks again: ``--vary store`` (default) gives each run a fresh output
and a fresh checkpoint directory (what a run on another input does: new checkpoint
stores on every node); ``--vary setting`` keeps the checkpoint stores and changes a
convergence setting instead (``min_progress``, part of every task's key). After each run
it prints every worker's RSS; the last line is ``rss_ratio_10_vs_1=<max over workers of
RSS after the last run / RSS after the first>`` (named after ``--runs``).

Acceptance (issue 30): ten runs of 64 tasks, the ratio at most 1.2.

Usage: python bench/bench_worker_memory.py [--runs 10] [--tasks 64] [--workers 2] [--vary store|setting]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import psutil
from distributed import Client

from rqml_dask import Pipeline
from rqml_dask.cluster import embedded_cluster
from rqml_dask.pipeline import load_pipeline_config
from rqml_dask.pipeline.config import ClusterSpec, PipelineConfig
from rqml_dask.synthetic import SynthSpec, write_synthetic

TILE = (16, 32, 32)
"""One task's core: 64 tasks are a 64 x 128 x 128 volume (the quickstart's), a run ~30 s here."""
TILES_PER_LAYER = 16
"""A layer of the volume along z: 128 x 128 in tiles of 32 x 32."""


def worker_rss() -> int:
    """This process's resident set size, in bytes (run on each worker)."""
    return psutil.Process().memory_info().rss


def run_config(base: PipelineConfig, tmp: Path, store: Path, run: int, vary: str) -> PipelineConfig:
    """The pipeline of run ``run``: its own output, and whatever makes every task compute again."""
    update = {
        "name": "memory",
        "input": base.input.model_copy(update={"store": store, "synthesize": None}),
        "output": base.output.model_copy(update={"store": tmp / f"out-{run}.zarr"}),
        "tiling": base.tiling.model_copy(update={"tile": TILE}),
    }
    if vary == "store":
        update["checkpoint"] = base.checkpoint.model_copy(update={"artifacts": tmp / f"checkpoints-{run}"})
    else:
        update["convergence"] = dataclasses.replace(base.convergence, min_progress=base.convergence.min_progress * (1 + run / 1000))
    return base.model_copy(update=update)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=64, help=f"a multiple of {TILES_PER_LAYER}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vary", choices=("store", "setting"), default="store")
    args = parser.parse_args(argv)
    if args.tasks <= 0 or args.tasks % TILES_PER_LAYER or args.runs < 1:
        parser.error(f"--tasks must be a positive multiple of {TILES_PER_LAYER}, --runs at least 1")
    shape = (TILE[0] * args.tasks // TILES_PER_LAYER, 128, 128)

    with tempfile.TemporaryDirectory(prefix="rqml-bench-memory-") as directory:
        tmp = Path(directory)
        store = write_synthetic(tmp / "in.zarr", SynthSpec(kind="cells", shape=shape, seed=3))
        base = load_pipeline_config("pipelines/quickstart.yaml")
        spec = ClusterSpec(n_workers=args.workers, dashboard_address="127.0.0.1:0")
        with embedded_cluster(spec) as cluster, Client(cluster) as client:
            print(f"volume {shape}, tiles {TILE}: {args.tasks} tasks per run, {args.workers} workers, vary {args.vary}")
            first: dict[str, int] = {}
            for run in range(1, args.runs + 1):
                started = time.perf_counter()
                report = Pipeline(run_config(base, tmp, store, run, args.vary)).run(client, progress=False)
                seconds = time.perf_counter() - started
                reused = sum(o.reused for o in report.outcomes)
                rss = client.run(worker_rss)
                first = first or rss
                figures = " ".join(f"{i}:{rss[w] / 2**20:.0f}MiB" for i, w in enumerate(sorted(rss)))
                print(f"run {run:>2}: {len(report.outcomes)} tasks ({reused} reused), {report.iterations} iterations, "
                      f"{seconds:.1f} s; worker RSS {figures}", flush=True)
            ratio = max(rss[w] / first[w] for w in rss if w in first)
            print(f"rss_ratio_{args.runs}_vs_1={ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
