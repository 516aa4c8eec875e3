"""Time to a first task: the embedded cluster ``rqml run`` starts against a bare ``LocalCluster`` (issue 32).

Each measurement is a fresh Python process (as each ``rqml run`` is). Three times: from
launching the process to the result of one trivial task (``first_task``: imports included:
``distributed`` for the bare cluster; for the embedded one what ``rqml run`` has imported by
then, the pipeline module, with the fork server started first, as ``rqml run`` starts it),
the cluster alone, from asking for it to that result, and the whole process, its exit and
the cluster's shutdown included:

* ``bare``: ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``, Dask's
  defaults otherwise (workers spawned);
* ``embedded``: ``rqml_dask.deploy.local.embedded_cluster`` with the same sizes: the
  scheduler and node preloads, the workers' settings, and on a host without a GPU workers
  forked from a fork server that imported the node's modules once.

Interleaved ``--repeats`` times; prints each and last ``bare_s=<median> embedded_s=<median>
ratio=<embedded/bare>`` of each of the three. Issue 32 asks for at most 1.2 to the first task.

Usage: python bench/bench_start.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

PROGRAMS = {
    "bare": """
import time
from distributed import Client, LocalCluster
if __name__ == "__main__":
    start = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        client.submit(lambda: 1, pure=False).result()
        print(time.time(), time.perf_counter() - start)
""",
    "embedded": """
import time
from rqml_dask.deploy.local import fork_server
fork_server()  # what rqml run does first
from distributed import Client
import rqml_dask.pipeline.pipeline
from rqml_dask.deploy.local import embedded_cluster
from rqml_dask.pipeline.config import ClusterSpec
if __name__ == "__main__":
    start = time.perf_counter()
    with embedded_cluster(ClusterSpec(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0")) as cluster, Client(cluster) as client:
        client.submit(lambda: 1, pure=False).result()
        print(time.time(), time.perf_counter() - start)
""",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in PROGRAMS}
    firsts: dict[str, list[float]] = {name: [] for name in PROGRAMS}
    clusters: dict[str, list[float]] = {name: [] for name in PROGRAMS}
    for repeat in range(args.repeats):
        for name, program in PROGRAMS.items():
            launched, start = time.time(), time.perf_counter()
            done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, check=True)
            times[name].append(time.perf_counter() - start)
            result_at, cluster = (float(v) for v in done.stdout.split()[-2:])
            firsts[name].append(result_at - launched)
            clusters[name].append(cluster)
            print(f"{repeat + 1} {name:<9} process {times[name][-1]:.2f} s, to the first result {firsts[name][-1]:.2f} s, "
                  f"cluster {clusters[name][-1]:.2f} s", flush=True)
    for what, measured in (("cluster", clusters), ("first_task", firsts), ("process", times)):
        bare, embedded = statistics.median(measured["bare"]), statistics.median(measured["embedded"])
        print(f"{what}: bare_s={bare:.2f} embedded_s={embedded:.2f} ratio={embedded / bare:.2f}")

if __name__ == "__main__":
    main()
