"""The `rqml` command as a user runs it: real subprocesses, an embedded cluster, Zarr on disk."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import zarr

from conftest import pipeline_dict, write_yaml
from timing import bound

pytestmark = pytest.mark.slow


def rqml(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rqml_dask.cli", *args], capture_output=True, text=True, timeout=bound(240), cwd=cwd
    )


def test_synth_then_run_prints_summary_with_both_errors(tmp_path):
    store = tmp_path / "vol.zarr"
    done = rqml("data", "synth", str(store), "--shape", "20,40,40", "--psf-sigma", "1.5,1,1", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert set(zarr.open_group(store, mode="r").keys()) == {"truth", "observed", "psf"}
    config = write_yaml(tmp_path / "p.yaml", pipeline_dict(store, tmp_path / "out.zarr", tiling={"tile": [10, 20, 20]}))
    done = rqml("run", str(config), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "dashboard    http://127.0.0.1:" in done.stderr
    assert re.search(r"^tasks\s+8 \(", done.stdout, re.M)
    errors = re.search(r"error vs truth \(relative RMSE\): input ([\d.]+) -> output ([\d.]+)", done.stdout)
    assert errors and float(errors[2]) < float(errors[1])
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "complete"


def test_bad_pipeline_is_refused_before_any_cluster_starts(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text("name: x\ninput: {store: nowhere.zarr}\noutput: {store: o.zarr}\ntiling: {tile: [8]}\nmodels: {ladder: [richardson_lucy]}\nconvergence: {check_every: -1}\n")
    done = rqml("run", str(config))
    assert done.returncode == 1
    assert f"{config}: 1 invalid setting(s):" in done.stderr
    assert "convergence.check_every: Input should be greater than 0 (got -1)" in done.stderr
    assert "dashboard" not in done.stderr
