"""The package as a user installs it: a wheel built from the repository, installed (not
editable) into a fresh virtualenv, runs the quickstart pipeline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import zarr

from timing import bound

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=bound(timeout))
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_wheel_holds_every_package_and_runs_the_quickstart_from_a_fresh_virtualenv(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", ROOT)
    [wheel] = (tmp_path / "dist").glob("rqml_dask-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "rqml_dask").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= inside, sorted(packages - {n.rsplit("/", 1)[0] for n in inside})

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    run(env / "bin" / "python", "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt", wheel)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "pipelines" / "quickstart.yaml", work)
    done = run(env / "bin" / "rqml", "run", "quickstart.yaml", "--no-progress", cwd=work)
    errors = re.search(r"error vs truth \(relative RMSE\): input ([\d.]+) -> output ([\d.]+)", done.stdout)
    assert errors, done.stdout
    assert zarr.open_group(work / "results" / "quickstart.zarr", mode="r").attrs["rqml"]["status"] == "complete"
