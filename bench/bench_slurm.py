"""``rqml run --cluster slurm`` against the embedded cluster on the same pipeline (issue 35).

A one-host Slurm (``tests/slurm_server.py``: munged, slurmctld, slurmd; root, Debian's
``slurm-wlm``) runs the nodes as jobs; the embedded cluster runs as many worker processes.
Each run is the real command in a subprocess, the two interleaved ``--rounds`` times on one
input, each with checkpoints of its own (nothing reused). Per run:

* ``first bound``: from starting the command to the scheduler binding the first task to a
  node (a client of the scheduler the command prints polls ``rqml_status`` every 20 ms);
* ``first iteration``: ... to the first iteration a node reports (its heartbeat);
* ``makespan``: the command's whole wall time (input check, cluster start, run, output).

Prints the medians and ``slurm_over_local`` ratios; the last line is
``first_task_s=<slurm> first_task_local_s=<local> makespan_ratio=<slurm/local>``.

    python bench/bench_slurm.py --rounds 3
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from distributed import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from slurm_server import OneHostSlurm, unavailable  # noqa: E402


def pipeline(root: Path, kind: str, i: int, nodes: int, shape: list[int]) -> Path:
    config = yaml.safe_load(Path("pipelines/quickstart.yaml").read_text())
    config["input"]["store"] = str(root / "input.zarr")
    config["input"]["synthesize"]["shape"] = shape
    config["output"]["store"] = str(root / f"{kind}-{i}.zarr")
    config["checkpoint"]["artifacts"] = str(root / f"{kind}-{i}.checkpoints")
    config["cluster"] = {"kind": kind, "n_workers": nodes, "dashboard_address": "127.0.0.1:0",
                         "slurm": {"jobs": nodes, "cores": 1, "memory": "2GiB", "interface": "lo",
                                   "local_directory": str(root / "jobs"), "log_directory": str(root / "logs")}}
    path = root / f"{kind}-{i}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def timed_run(path: Path, env: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "rqml_dask.cli", "run", str(path), "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    found: dict[str, float] = {}
    err_lines: list[str] = []

    def watch(address: str) -> None:
        with Client(address, timeout=30) as client:
            while process.poll() is None and "first_iteration_s" not in found:
                state = client.sync(client.scheduler.rqml_status, limit=0)
                now = time.perf_counter() - started
                runs = state["runs"]
                if state["counts"].get("bound", 0) + state["counts"].get("done", 0) > 0:
                    found.setdefault("first_bound_s", now)
                if any(r["iterations"] > 0 for r in runs.values()):
                    found.setdefault("first_iteration_s", now)
                time.sleep(0.02)

    watcher = None
    for line in process.stderr:
        err_lines.append(line)
        if watcher is None and (m := re.match(r"cluster\s+\w+ at (\S+):", line)):
            watcher = threading.Thread(target=watch, args=(m[1],), daemon=True)
            watcher.start()
    out = process.stdout.read()
    process.wait()
    found["makespan_s"] = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{path.name}: exit {process.returncode}\n{out}{''.join(err_lines)}")
    if watcher is not None:
        watcher.join(5)
    found["run_s"] = float(re.search(r"^time\s+([\d.]+) s", out, re.M)[1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--shape", default="64,128,128", help="the synthetic input (z,y,x): the quickstart's by default")
    args = parser.parse_args()
    if (why := unavailable()) is not None:
        sys.exit(f"bench_slurm: {why}")
    shape = [int(v) for v in args.shape.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp, OneHostSlurm(Path(tmp) / "slurm") as slurm:
        root = Path(tmp)
        results: dict[str, list[dict[str, float]]] = {"local": [], "slurm": []}
        for i in range(args.rounds):
            for kind in ("local", "slurm"):
                r = timed_run(pipeline(root, kind, i, args.nodes, shape), slurm.environ)
                results[kind].append(r)
                print(f"round {i} {kind:<6} " + " ".join(f"{k}={v:.2f}" for k, v in r.items()), flush=True)
        med = {kind: {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]} for kind, runs in results.items()}
        for k in med["local"]:
            print(f"{k:<18} local {med['local'][k]:7.2f}  slurm {med['slurm'][k]:7.2f}  slurm_over_local {med['slurm'][k] / med['local'][k]:.2f}")
        print(f"first_task_s={med['slurm']['first_iteration_s']:.2f} first_task_local_s={med['local']['first_iteration_s']:.2f} "
              f"makespan_ratio={med['slurm']['makespan_s'] / med['local']['makespan_s']:.2f}")


if __name__ == "__main__":
    main()
