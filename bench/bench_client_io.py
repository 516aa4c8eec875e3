"""What the client of a run reads, and how soon the first task refines, as the input grows.

For each ``--sizes`` (MiB of float32 input), a volume of ``(size/4, 1024, 1024)`` voxels is
written chunk by chunk (Poisson counts, no truth), then run as ``rqml run`` runs it, in this
process: ``Pipeline.prepare``, the embedded cluster (worker processes), ``Pipeline.run``,
and the slices PNG and report drawn while the cluster is up. Tiles ``(32, 256, 512)`` (32
tasks at 512 MiB), ``--iterations`` RL iterations each. Reported per size:

- ``rchar``: bytes this process read (``/proc/self/io``: the client and the scheduler, as
  in ``rqml run``; the workers are other processes) from ``prepare`` until the pictures are
  drawn, before the cluster closes (a reaped child's reads are added to its parent's
  ``rchar``), as a fraction of the input's bytes;
- ``first``: seconds from ``prepare`` to the first task refining on a node (its ``queued``
  event on ``rqml-task_inbound``), and its ratio to the smallest size's;
- ``wall``: the whole run against the kernel's share of it, ``(total iterations x the time
  of one RL iteration on the largest window, measured on every worker at once, as they
  share the machine during the run, before the run and after it: the mean) / workers``
  (the time measuring before the run takes is not the run's); the client's peak RSS
  from ``prepare`` on (``VmHWM``, reset after the input is written: writing it is the
  bench's, not the run's) and each worker's against a task window's bytes; the CPU seconds
  this process (client and scheduler) and the workers (from their start) spent, against the
  kernel's (where the run's time beyond the kernel goes).

Usage: python bench/bench_client_io.py [--sizes 64,512,2048] [--iterations 2] [--workers 2] [--check-every 5]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr
from distributed import Client

from rqml_dask import Pipeline, events
from rqml_dask.deploy.local import embedded_cluster
from rqml_dask.pipeline import load_pipeline_config
from rqml_dask.pipeline.config import ClusterSpec
from rqml_dask.report import write_report, write_slices
from rqml_dask.synthetic import gaussian_psf

CHUNK = (16, 256, 256)
TILE = (32, 256, 512)


def write_input(store: Path, planes: int) -> int:
    """A ``(planes, 1024, 1024)`` float32 volume of Poisson counts and a small Gaussian PSF;
    the volume's bytes."""
    group = zarr.open_group(store, mode="w")
    observed = group.create_array("observed", shape=(planes, 1024, 1024), chunks=CHUNK, dtype=np.float32)
    rng = np.random.default_rng(0)
    for z in range(0, planes, CHUNK[0]):
        observed[z:z + CHUNK[0]] = rng.poisson(20.0, (min(CHUNK[0], planes - z), 1024, 1024)).astype(np.float32)
    group.create_array("psf", data=gaussian_psf((1.0, 1.0, 1.0)))
    return observed.nbytes


def iteration_seconds(task) -> float:
    """The median time of one Richardson-Lucy iteration on ``task``'s window, here, with the
    node's backend (NumPy, one FFT thread), over 9 iterations. The model's operators are not
    left in the process's cache (the run's first task builds its own, as without the bench)."""
    from rqml_dask.arrays import numpy_backend
    from rqml_dask.problem import load_problem
    from rqml_plugins.deconvolution import _convolution
    from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy

    _, problem = load_problem(task, numpy_backend())
    model = RichardsonLucy(problem, numpy_backend())
    times = []
    for _ in range(9):
        start = time.perf_counter()
        model.step()
        times.append(time.perf_counter() - start)
    _convolution._OPERATORS.clear()
    return sorted(times)[4]


def rchar() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])


def reset_peak_rss() -> None:
    """Start this process's peak RSS (``VmHWM``) afresh: what writing the input (here) or
    measuring the kernel (on a worker) cost is the bench's, not the run's."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """This process's peak RSS since :func:`reset_peak_rss`, in bytes."""
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")).split()[1]) * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,512,2048", help="input sizes in MiB")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--check-every", type=int, default=5, help="iterations between convergence checks (the quickstart's 5)")
    args = parser.parse_args(argv)
    quickstart = load_pipeline_config("pipelines/quickstart.yaml")
    fixed = {"max_iterations": args.iterations, "check_every": args.check_every, "stability_tol": 0.0, "consistency_tol": 0.0,
             "novelty_window": 10**6, "held_out_fraction": 0.0, "accept_max_iterations": True}
    tmp = Path(tempfile.mkdtemp(prefix="rqml-client-io-"))
    rows = []
    for mib in (int(v) for v in args.sizes.split(",")):
        store = tmp / f"in-{mib}.zarr"
        nbytes = write_input(store, mib // 4)
        pipeline = Pipeline(quickstart.model_copy(update={
            "name": f"io-{mib}",
            "input": quickstart.input.model_copy(update={"store": store, "synthesize": None, "truth": None,
                                                         "counts_per_unit": 1.0}),
            "output": quickstart.output.model_copy(update={"store": tmp / f"out-{mib}.zarr"}),
            "tiling": quickstart.tiling.model_copy(update={"tile": TILE}),
            "models": quickstart.models.model_copy(update={"ladder": ("richardson_lucy",)}),
            "convergence": replace(quickstart.convergence, **fixed),
            "checkpoint": quickstart.checkpoint.model_copy(update={"artifacts": tmp / f"ckpt-{mib}"}),
            "cluster": ClusterSpec(n_workers=args.workers, dashboard_address="127.0.0.1:0"),
        }))
        first: list[float] = []
        reset_peak_rss()
        read_before, started, cpu_before = rchar(), time.perf_counter(), time.process_time()
        tasks = pipeline.prepare()
        with embedded_cluster(pipeline.config.cluster) as cluster, Client(cluster) as client:
            # the kernel as the run's workers see it, before and after the run (this shared
            # machine's speed drifts over a long run): every worker iterating at once
            largest = max(tasks, key=lambda t: math.prod(b - a for a, b in t.region.window))
            measuring = time.perf_counter()
            kernels_before = client.run(iteration_seconds, largest)
            client.run(reset_peak_rss)  # the workers' peaks are the run's
            measured = time.perf_counter() - measuring  # not the run's: taken off its wall time
            client.subscribe_topic(events.TASK_INBOUND, lambda event: event[1].get("kind") == "queued" and not first
                                   and first.append(time.perf_counter() - started - measured))
            report = pipeline.run(client, progress=False, tasks=tasks)
            write_report(Path(pipeline.config.output.store), slices=write_slices(Path(pipeline.config.output.store)).read_bytes())
            wall = time.perf_counter() - started - measured
            read, client_cpu = rchar() - read_before, time.process_time() - cpu_before
            workers_cpu = sum(client.run(time.process_time).values())
            workers = client.run(peak_rss)
            kernels_after = client.run(iteration_seconds, largest)
        assert not report.rejected, report.summary()
        peak = peak_rss() / 2**20
        window = max(math.prod(b - a for a, b in t.region.window) for t in tasks) * 4
        before, after = (sum(k.values()) / len(k) for k in (kernels_before, kernels_after))
        kernel = (before + after) / 2
        ideal = report.iterations * kernel / args.workers
        rows.append((mib, len(tasks), read, nbytes, first[0] if first else float("nan"), wall, peak))
        print(f"{mib:>6} MiB {len(tasks):>4} tasks: client read {read / 2**20:8.1f} MiB = {read / nbytes:6.2%} of the input; "
              f"first task refining after {rows[-1][4]:6.2f} s; run {wall:6.1f} s = {wall / ideal:.2f} x the kernel's "
              f"{ideal:.1f} s ({report.iterations} iterations x {kernel * 1000:.0f} ms, the mean of {before * 1000:.0f} before the run "
              f"and {after * 1000:.0f} after, / {args.workers} workers; CPU s: this process "
              f"{client_cpu:.1f}, workers {workers_cpu:.1f} against the kernel's {report.iterations * kernel:.1f}); client peak "
              f"RSS {peak:.0f} MiB; worker peak RSS {max(workers.values()) / 2**20:.0f} MiB = 4 x window "
              f"({window / 2**20:.0f} MiB) + {(max(workers.values()) - 4 * window) / 2**20:.0f} MiB", flush=True)
    base = rows[0][4]
    for mib, _, read, nbytes, first_s, _, _ in rows:
        print(f"size_mib={mib} read_fraction={read / nbytes:.4f} first_s={first_s:.2f} first_ratio={first_s / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
