"""What checkpointing costs and what it saves.

1. Throughput: one Richardson-Lucy task with a 4 MiB state (64x128x128 float32) refined by
   a real node orchestrator, with a checkpoint every iteration (real LMDB and Zarr on disk)
   vs no checkpoints; iterations per second, ratio. Interleaved runs, best of ``--repeats``.
2. Recovery: one long task on a one-worker cluster (with its Nanny), a checkpoint every
   second; SIGKILL the worker; time from the kill until the task iterates again on the
   restarted worker, and iterations lost (the iteration at the kill minus the one resumed from).

Usage: python bench/bench_checkpoint.py [--iterations 150] [--repeats 3] [--kills 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from distributed import Client

from rqml_dask import Pipeline
from rqml_dask.arrays import numpy_backend
from rqml_dask.deploy.local import embedded_cluster
from rqml_dask.node.checkpointer import Checkpointer
from rqml_dask.node.orchestrator import NodeOrchestrator
from rqml_dask.messages import NodePolicy
from rqml_dask.node.resources import ResourceMonitor
from rqml_dask.pipeline.config import ClusterSpec
from rqml_dask.stores.artifacts import ArtifactStore
from rqml_dask.stores.lmdb_store import LMDBStore
from rqml_dask.synthetic import SynthSpec, gaussian_psf, write_synthetic
from rqml_dask.task import ArrayRef, CheckpointSettings, ConvergenceSettings, Region, RQMLTask, TaskInput

SHAPE = (64, 128, 128)  # 4 MiB of float32
NEVER_STOP = dict(stability_tol=0, consistency_tol=0, novelty_window=10**9, held_out_fraction=0)


def throughput(root: Path, iterations: int, checkpoint_every: int | None) -> float:
    """Iterations per second of one task on a fresh orchestrator."""
    ref = ArrayRef("/unused", "x")
    settings = None
    if checkpoint_every:
        settings = CheckpointSettings(local=f"lmdb://{root}/node.lmdb", artifacts=str(root / "artifacts"), every_iterations=checkpoint_every)
    task = RQMLTask(
        task_id=f"bench/{time.monotonic_ns()}", task_class="deconvolution", region=Region(((0, 64), (0, 128), (0, 128)), ((0, 64), (0, 128), (0, 128))),
        input=TaskInput(ref, ref), output=ref, model_ladder=("richardson_lucy",),
        convergence=ConvergenceSettings(max_iterations=iterations, **NEVER_STOP), checkpoint=settings,
    )
    rng = np.random.default_rng(0)
    problem = {"image": rng.random(SHAPE, dtype=np.float32), "psf": gaussian_psf((2.0, 1.2, 1.2))}
    orchestrator = NodeOrchestrator(numpy_backend(), root / "node", ResourceMonitor(None), NodePolicy(max_concurrency=1))
    checkpointer = Checkpointer(LMDBStore(root / "node.lmdb"), None, ArtifactStore(root / "artifacts"), "bench") if settings else None
    orchestrator.start()
    try:
        start = time.perf_counter()
        refinement = orchestrator.submit(task, problem, checkpointer).result()
        elapsed = time.perf_counter() - start
    finally:
        orchestrator.stop()
    if checkpointer:
        checkpointer.flush()
        checkpointer.stop()
        print(
            f"    asked every {checkpoint_every} iteration(s): {checkpointer.writes} written, the newest at "
            f"iteration {checkpointer.written[task.key].iteration} of {refinement.iteration}"
        )
    return refinement.iteration / elapsed


def recovery(root: Path, kills: int) -> list[tuple[float, int]]:
    store = write_synthetic(root / "in.zarr", SynthSpec(shape=(32, 64, 64), seed=3))
    results = []
    spec = ClusterSpec(n_workers=1, dashboard_address="127.0.0.1:0")
    with embedded_cluster(spec) as cluster, Client(cluster) as client:
        for attempt in range(kills):
            config = Pipeline.from_yaml("pipelines/quickstart.yaml").config
            config = config.model_copy(update={
                "name": f"recovery{attempt}",
                "input": config.input.model_copy(update={"store": store, "synthesize": None}),
                "output": config.output.model_copy(update={"store": root / f"out{attempt}.zarr"}),
                "tiling": config.tiling.model_copy(update={"tile": (32, 64, 64)}),
                "convergence": ConvergenceSettings(max_iterations=100000, **NEVER_STOP),
                "checkpoint": config.checkpoint.model_copy(update={"every_iterations": None, "every_seconds": 1.0}),
                "models": config.models.model_copy(update={"ladder": ["richardson_lucy"], "params": {}}),
            })
            [future] = Pipeline(config).submit(client)
            time.sleep(2.5 + attempt * 0.37)  # a few checkpoints in, at a different phase each time

            def iteration(dask_worker):
                node = dask_worker.plugins.get("rqml-node")
                active = node.orchestrator.refining if node else []
                return (active[0].refinement.iteration, active[0].refinement.resumed_from) if active else None

            [(address, (at_kill, _))] = client.run(iteration).items()
            pid = client.run(os.getpid)[address]
            killed = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while True:
                try:
                    state = next(iter(client.run(iteration).values()), None)
                except Exception:
                    state = None
                if state and state[1] is not None and state[0] > state[1]:
                    break
                time.sleep(0.01)
            results.append((time.perf_counter() - killed, at_kill - state[1]))
            client.cancel(future)
            time.sleep(0.5)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="rqml-bench-ckpt-"))
    print(f"1. one task, state {SHAPE} float32 (4 MiB), {args.iterations} iterations, best of {args.repeats}")
    plain, checkpointed = [], []
    for r in range(args.repeats):
        plain.append(throughput(root / f"plain{r}", args.iterations, None))
        checkpointed.append(throughput(root / f"ckpt{r}", args.iterations, 1))
    print(f"   no checkpoints:             {max(plain):8.2f} iterations/s")
    print(f"   checkpoint every iteration: {max(checkpointed):8.2f} iterations/s")
    print(f"   ratio: {max(checkpointed) / max(plain):.3f} (target >= 0.95)")
    print(f"2. recovery, checkpoint every 1 s, {args.kills} SIGKILLs of the only worker")
    for seconds, lost in recovery(root, args.kills):
        print(f"   iterating again {seconds:5.2f} s after the kill; iterations lost {lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
