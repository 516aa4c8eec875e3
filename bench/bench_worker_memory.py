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

``--trace N``: each worker traces its allocations (``tracemalloc``, N frames) from the end
of the first run; after the last it prints the ``--top`` source lines by the bytes they
allocated since and still hold (where the growth is, if Python or NumPy holds it; it slows
the runs down). ``--sizes``: after each run, the MiB of Python objects each worker holds in
Dask's profile history and logs, its task data, the open arrays and the node's jobs and
checkpoint writers.

Usage: python bench/bench_worker_memory.py [--runs 10] [--tasks 64] [--workers 2] [--vary store|setting] [--trace N] [--sizes]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from distributed import Client

from rqml_dask import Pipeline
from rqml_dask.deploy.local import embedded_cluster
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


def start_tracing(frames: int) -> None:
    """Trace this worker's allocations from now (run on each worker)."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start(frames)


def traced_growth(top: int) -> list[str]:
    """What this worker allocated since :func:`start_tracing` and still holds: the total, and the
    ``top`` lines by bytes (each with the innermost frames outside Python's own modules)."""
    import gc
    import tracemalloc

    from rqml_dask import volumes

    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = snapshot.statistics("traceback")
    lines = [f"traced and still held: {sum(s.size for s in stats) / 2**20:.1f} MiB in {sum(s.count for s in stats)} blocks; "
             f"volumes.open_array holds {len(volumes._opened)} arrays"]
    for stat in stats[:top]:
        frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(stat.traceback)]
        lines.append(f"{stat.size / 2**20:7.2f} MiB {stat.count:6d} blocks  " + " <- ".join(frames[:4]))
    return lines


def held_sizes(dask_worker: Any) -> dict[str, float]:
    """MiB reachable from what a worker keeps between runs (run on each worker): Dask's profile
    history and logs, its task results, the arrays :func:`rqml_dask.volumes.open_array`
    keeps open, the node plugin's jobs and checkpointers. Objects shared between them count
    in the first that reaches them."""
    import gc
    import sys
    import types

    import numpy as np

    from rqml_dask import volumes

    worker = dask_worker
    node = worker.plugins.get("rqml-node") or next((p for p in worker.plugins.values() if hasattr(p, "checkpointers")), None)
    skipped = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.CodeType)
    stop = {id(worker), id(worker.state), id(node)}
    seen: set[int] = set()

    def size(*roots) -> float:
        stack, total = list(roots), 0
        while stack:
            obj = stack.pop()
            if id(obj) in seen or id(obj) in stop or isinstance(obj, skipped):
                continue
            seen.add(id(obj))
            total += obj.nbytes if isinstance(obj, np.ndarray) and obj.base is None else sys.getsizeof(obj)
            if not isinstance(obj, np.ndarray):
                stack.extend(gc.get_referents(obj))
        return total / 2**20

    gc.collect()
    return {"profile": size(worker.profile_history, worker.profile_keys_history, worker.profile_recent, worker.profile_keys),
            "worker logs": size(worker.state.log, worker.state.stimulus_log, worker.transfer_incoming_log, worker.transfer_outgoing_log),
            "task data": size(worker.data), "open arrays": size(volumes._opened),
            "node jobs": size(getattr(node, "jobs", None)), "checkpointers": size(getattr(node, "checkpointers", None))}


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
    parser.add_argument("--trace", type=int, default=0, metavar="FRAMES", help="trace each worker's allocations after the first run")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--sizes", action="store_true", help="after each run, the MiB each worker holds in its caches and logs")
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
                if args.sizes:
                    for i, (worker, sizes) in enumerate(sorted(client.run(held_sizes).items())):
                        print(f"  worker {i} holds, MiB: " + ", ".join(f"{name} {mib:.1f}" for name, mib in sizes.items()), flush=True)
                if run == 1 and args.trace:
                    client.run(start_tracing, args.trace)
            if args.trace:
                for i, (worker, lines) in enumerate(sorted(client.run(traced_growth, args.top).items())):
                    print(f"worker {i} ({worker}), since the first run:")
                    print("\n".join(f"  {line}" for line in lines))
            ratio = max(rss[w] / first[w] for w in rss if w in first)
            print(f"rss_ratio_{args.runs}_vs_1={ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
