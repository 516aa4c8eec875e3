"""What a scheduler outage costs a run: makespan with the scheduler SIGKILLed mid-run and
started again ``--outage`` seconds later, against the same run with no outage.

Real processes: ``dask scheduler --preload rqml_dask.scheduler`` and two ``dask worker
--worker-class rqml_dask.node.RQMLWorker`` (with their Nannies), the sleepy test model
(``tests/sleepy_model.py``: each iteration sleeps ``--delay``, so the CPU is not the limit
on this 2-core machine). With degraded mode the nodes go on through the outage, so the
makespan should grow by the reconnection only (the client's and the nodes'), not by the
outage; "iterations run" counts every iteration the nodes ran, so anything recomputed shows.

Usage: python bench/bench_outage.py [--iterations 300] [--delay 0.02] [--outage 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from distributed import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dask_processes import dask_scheduler, rqml_worker  # noqa: E402
from etcd_server import free_port  # noqa: E402
from heterogeneous_cluster import sleepy_pipeline  # noqa: E402

from rqml_dask.synthetic import SynthSpec, write_synthetic  # noqa: E402

TILE = [12, 24, 48]  # 4 tasks


def run_once(root: Path, store: Path, iterations: int, delay: float, outage: float | None) -> tuple[float, int, float]:
    """Makespan, the iterations the nodes ran, and how long after the scheduler's return the
    client was connected again, for one run (with an outage if given)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = dask_scheduler(port, root / "scheduler.log").start()
    workers = [rqml_worker(address, f"node-{i}", free_port(), root / "workers").start() for i in range(2)]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            client.sync(client.scheduler.rqml_policy, policy={"version": 2, "min_concurrency": 4})
            pipeline = sleepy_pipeline(store, root / "out.zarr", TILE, iterations, delay, "outage")
            result: dict = {}
            started = time.perf_counter()
            thread = threading.Thread(target=lambda: result.update(report=pipeline.run(client, progress=False), end=time.perf_counter()))
            thread.start()
            reconnected = 0.0
            if outage is not None:
                time.sleep(2.0)
                scheduler.kill()
                time.sleep(outage)
                scheduler = dask_scheduler(port, root / "scheduler.log").start()
                back = time.perf_counter()
                while client.status != "running":
                    time.sleep(0.01)
                reconnected = time.perf_counter() - back
            thread.join()
            makespan = result["end"] - started
            ran = client.run(lambda dask_worker: dask_worker.plugins["rqml-node"].orchestrator.counters.iterations)
            return makespan, sum(ran.values()), reconnected
    finally:
        for worker in workers:
            worker.kill()
        scheduler.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--outage", type=float, default=5.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = write_synthetic(root / "data.zarr", SynthSpec(kind="cells", shape=(24, 48, 48), seed=1))
        plain, plain_iterations, _ = run_once(root / "plain", store, args.iterations, args.delay, None)
        broken, broken_iterations, reconnected = run_once(root / "outage", store, args.iterations, args.delay, args.outage)
    work = 4 * args.iterations
    print(f"4 tasks x {args.iterations} iterations x {args.delay * 1000:g} ms on 2 nodes; outage {args.outage:g} s from t=2 s")
    print(f"no outage     makespan {plain:6.2f} s   iterations run {plain_iterations} (work {work})")
    print(f"with outage   makespan {broken:6.2f} s   iterations run {broken_iterations}   "
          f"(the caller's own Client reconnected {reconnected:.2f} s after the scheduler was back)")
    print(f"ratio {broken / plain:.3f}; the outage would add {args.outage:g} s ({(plain + args.outage) / plain:.3f}) if nothing ran meanwhile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
