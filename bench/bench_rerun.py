"""``rqml run`` of the quickstart again, every result reused: wall time against the code before (issue 32).

Runs ``rqml run pipelines/quickstart.yaml --no-progress`` once in each of two fresh
directories (the data generated, every task computed): one with this checkout's code, one
with the code in ``--baseline`` (a checkout of an older commit, e.g. ``git worktree add
/tmp/rqml-before b3254e5``: its ``rqml_dask`` and ``plugins`` are put first on
``PYTHONPATH``; the same virtual environment; task keys name the code, so each needs its own
first run). Then it times ``--repeats`` reruns in each, interleaved. Each rerun is a fresh process, everything included: imports, the
run, the pyramid, the slices and the report. Prints each rerun's wall time, whether it
started a cluster, and last ``rerun_s=<median> before_s=<median> ratio=<rerun/before>``.

Acceptance (issue 32): the rerun at most 3 s.

Usage: python bench/bench_rerun.py --baseline DIR [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rqml_run(directory: Path, tree: Path | None, reused: bool = True) -> tuple[float, str]:
    """Wall seconds of ``rqml run quickstart.yaml`` in ``directory`` with the code in
    ``tree`` (``None``: this checkout's), and its stderr; it must exit 0, with every result
    reused where ``reused``."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "plugins"), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from rqml_dask.cli import main; main()", "run", "quickstart.yaml",
                           "--no-progress"], cwd=directory, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or (reused and "8 reused from an earlier run" not in done.stdout):
        raise SystemExit(f"rqml run failed in {directory} (code {tree or ROOT}):\n{done.stdout}\n{done.stderr}")
    return elapsed, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the code to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rerun-") as tmp:
        now, before = Path(tmp, "now"), Path(tmp, "before")
        for name, directory, tree in (("now", now, None), ("before", before, args.baseline.resolve())):
            directory.mkdir()
            shutil.copy(ROOT / "pipelines" / "quickstart.yaml", directory)
            first, _ = rqml_run(directory, tree, reused=False)
            print(f"first run {name:<6} (data generated, 8 tasks computed): {first:.2f} s")
        times: dict[str, list[float]] = {"now": [], "before": []}
        for repeat in range(args.repeats):
            for name, directory, tree in (("now", now, None), ("before", before, args.baseline.resolve())):
                elapsed, stderr = rqml_run(directory, tree)
                cluster = next((line for line in stderr.splitlines() if line.startswith("cluster")), "?")
                times[name].append(elapsed)
                print(f"rerun {repeat + 1} {name:<6} {elapsed:6.2f} s   {cluster}")
        rerun, baseline = statistics.median(times["now"]), statistics.median(times["before"])
        print(f"rerun_s={rerun:.2f} before_s={baseline:.2f} ratio={rerun / baseline:.3f}")


if __name__ == "__main__":
    main()
