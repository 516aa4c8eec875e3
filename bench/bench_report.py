"""Time and size of ``rqml report`` and ``rqml show`` on a simulated finished run of many tasks.

The output store is written as ``Pipeline.finalize`` leaves a rejected run, without running
anything: ``--tasks`` outcomes on a 3-D grid of 4x8x8 tiles, 16 layers along z, each with a
convergence trace of ``--trace`` checks (15 % escalated once, 5 % twice; 1 % not accepted);
a result chunked by tile, as a run writes it (the tiles are small, their number is what
costs: a slice reads every chunk it crosses), and an observed and truth volume chunked
64x64x64 in an input store beside it, as ``rqml data synth`` writes them. Prints the size of the group's attributes, then
the time and size of the report and of the PNG (each one run, in this process).

    .venv/bin/python bench/bench_report.py --tasks 10000 --trace 40 --store /tmp/bench-report.zarr
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import zarr

from rqml_dask.report import write_report, write_slices
from rqml_dask.volumes import write_outcome_records

TILE = (4, 8, 8)
LAYERS = 16
LADDER = ["richardson_lucy", "richardson_lucy_accelerated", "richardson_lucy_tv"]


def outcome(i: int, core: list[list[int]], checks: int, rng: np.random.Generator) -> dict:
    """One task's record as ``_outcome_record`` writes it (the fields the report reads)."""
    climbed = 2 if i % 20 == 0 else 1 if i % 20 < 4 else 0
    state = ("stalled", "max_iterations", "failed")[i % 3] if i % 100 == 7 else "accepted"
    rate = rng.uniform(0.02, 0.1)
    trace = []
    for n in range(checks):
        model = LADDER[min(climbed, n * (climbed + 1) // checks)]
        fresh = n == 0 or trace[-1]["model"] != model
        misfit = 0.5 * math.exp(-rate * n) + 1e-3
        trace.append({"iteration": 5 * (n + 1), "model": model, "misfit": misfit,
                      "stability": None if fresh else rate * misfit, "consistency": None, "novelty": None})
    return {"task_id": f"bench/{i}", "state": state, "status": "converged", "iterations": 5 * checks,
            "model": LADDER[climbed], "escalations": climbed, "node": f"tcp://10.0.0.{i % 50}:4000", "core": core,
            "models": [], "validation_failures": [], "held_out": None, "trace": trace}


def simulated_run(store: Path, tasks: int, checks: int) -> Path:
    """Write the output store of a finished run of ``tasks`` tasks (:data:`LAYERS` layers of tiles)."""
    columns = math.ceil(math.sqrt(tasks / LAYERS))
    rows = math.ceil(tasks / LAYERS / columns)
    shape = (LAYERS * TILE[0], rows * TILE[1], columns * TILE[2])
    rng = np.random.default_rng(0)
    source = store.with_name(store.name.removesuffix(".zarr") + ".input.zarr")
    for path in (store, source):
        shutil.rmtree(path, ignore_errors=True)
    inputs = zarr.open_group(source, mode="w")
    for name in ("observed", "truth"):
        inputs.create_array(name, data=rng.random(shape, dtype=np.float32), chunks=(64, 64, 64))
    group = zarr.open_group(store, mode="w")
    group.create_array("deconvolved", data=rng.random(shape, dtype=np.float32), chunks=TILE, dimension_names=("z", "y", "x"))
    outcomes = []
    for i in range(tasks):
        z, rest = divmod(i, rows * columns)
        y, x = divmod(rest, columns)
        core = [[a * t, (a + 1) * t] for a, t in zip((z, y, x), TILE)]
        outcomes.append(outcome(i, core, checks, rng))
    group.attrs["rqml"] = {
        "status": "rejected", "pipeline": "bench", "task_class": "deconvolution", "tasks": tasks,
        "input": {"image": {"store": str(source), "path": "observed"}, "truth": {"store": str(source), "path": "truth"}},
        "array": "deconvolved", "iterations": sum(o["iterations"] for o in outcomes),
        "escalations": sum(o["escalations"] for o in outcomes),
        "rejected": {o["task_id"]: o["state"] for o in outcomes if o["state"] != "accepted"},
        "input_error": 0.6, "output_error": 0.5, "outcomes": write_outcome_records(store, outcomes),
    }
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--trace", type=int, default=40, help="convergence checks per task")
    parser.add_argument("--store", type=Path, default=Path("/tmp/bench-report.zarr"))
    args = parser.parse_args()
    store = simulated_run(args.store, args.tasks, args.trace)
    print(f"{args.tasks} tasks, {args.trace} checks each; the group's zarr.json: {(store / 'zarr.json').stat().st_size / 2**20:.1f} MiB")
    for name, write in (("report", write_report), ("slices", write_slices)):
        started = time.perf_counter()
        path = write(store)
        print(f"{name:<8}{time.perf_counter() - started:6.2f} s  {path.stat().st_size / 2**20:6.2f} MiB  {path}")


if __name__ == "__main__":
    main()
