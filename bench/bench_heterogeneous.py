"""Makespan on workers of unequal speed: the RQML scheduler plugin vs Dask's default placement.

Three single-threaded worker processes, two at full speed and one slowed ``--slow`` times
(``tests/sleepy_model.py``: each iteration sleeps ``delay * slowdown``, so the CPU is not the
limit on this 2-core machine). The same pipeline (27 tasks) runs on a cluster whose scheduler
has the RQML plugin and on one without it (Dask's default placement; the node plugin is on
both). Ideal makespan = total work / total capacity = tasks * iterations * delay / sum(1/slowdown).

Usage: python bench/bench_heterogeneous.py [--iterations 40] [--delay 0.01] [--slow 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from distributed import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from heterogeneous_cluster import heterogeneous_cluster, placement, sleepy_pipeline, timed_run  # noqa: E402

from rqml_dask.synthetic import SynthSpec, write_synthetic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--delay", type=float, default=0.01)
    parser.add_argument("--slow", type=float, default=3.0)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="rqml-bench-het-"))
    store = write_synthetic(root / "in.zarr", SynthSpec(shape=(24, 48, 48), psf_sigma=(1.5, 1.0, 1.0), seed=1))
    slowdowns = [1.0, 1.0, args.slow]
    tasks = 27
    ideal = tasks * args.iterations * args.delay / sum(1 / s for s in slowdowns)
    print(f"{tasks} tasks x {args.iterations} iterations x {args.delay * 1e3:g} ms, node slowdowns {slowdowns}")
    print(f"ideal makespan (total work / total capacity): {ideal:.2f} s")
    for rqml in (True, False):
        with heterogeneous_cluster(slowdowns, rqml_scheduler=rqml) as cluster, Client(cluster) as client:
            client.wait_for_workers(3)
            warmup = sleepy_pipeline(store, root / f"warm-{rqml}.zarr", [24, 48, 48], 1, args.delay, f"warm{rqml}")
            warmup.run(client, progress=False)  # imports and first-task costs out of the timing
            pipeline = sleepy_pipeline(store, root / f"out-{rqml}.zarr", [8, 16, 16], args.iterations, args.delay, f"het{rqml}")
            makespan, report = timed_run(client, pipeline)
            report_counts = placement(client, report)
        name = "RQML scheduler plugin" if rqml else "Dask default placement"
        print(f"{name:<24} makespan {makespan:6.2f} s = {makespan / ideal:.2f} x ideal; tasks per node {report_counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
