"""Beyond the quickstart's 8 tasks: a run of more than a hundred, and a client that reads
only metadata, the operator and one chunk of its input however large it is."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from rqml_dask import Pipeline
from rqml_dask.report import FinishedRun
from rqml_dask.synthetic import gaussian_psf

from conftest import pipeline_dict, write_yaml
from test_cli import rqml


def rchar() -> int:
    """Bytes this process has read (``/proc/self/io``)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])


def test_preparing_a_run_reads_a_small_part_of_its_input(tmp_path):
    """``Pipeline.prepare`` (what ``rqml run`` does before any cluster starts) reads
    metadata, the PSF and at most one chunk: not the input's values, which the nodes check
    where they read them."""
    store = tmp_path / "in.zarr"
    group = zarr.open_group(store, mode="w")
    observed = group.create_array("observed", shape=(64, 256, 512), chunks=(16, 128, 128), dtype=np.float32)
    rng = np.random.default_rng(0)
    for z in range(0, 64, 16):  # incompressible: the bytes on disk are the input's
        observed[z:z + 16] = rng.random((16, 256, 512), dtype=np.float32)
    observed[5, 6, 7] = np.nan  # a bad value: found by the node that reads it, not here
    group.create_array("psf", data=gaussian_psf((1.0, 1.0, 1.0)))
    config = pipeline_dict(store, tmp_path / "out.zarr", input={"store": str(store)}, tiling={"tile": [16, 128, 256]})
    pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config))
    before = rchar()
    tasks = pipeline.prepare()
    read = rchar() - before
    assert len(tasks) == 16
    assert read < 0.1 * observed.nbytes, f"prepare read {read} bytes of a {observed.nbytes}-byte input"


@pytest.mark.slow
def test_a_run_of_128_tasks_exits_0_with_its_report_and_slices_and_its_rerun_needs_no_cluster(tmp_path):
    store = tmp_path / "vol.zarr"
    done = rqml("data", "synth", str(store), "--shape", "32,64,128", "--psf-sigma", "1,1,1", "--seed", "5")
    assert done.returncode == 0, done.stderr
    fixed = {"max_iterations": 3, "check_every": 1, "stability_tol": 0, "consistency_tol": 0, "novelty_window": 1000,
             "accept_max_iterations": True}
    out = tmp_path / "out.zarr"
    config = pipeline_dict(store, out, tiling={"tile": [8, 16, 16], "halo": "auto"}, convergence=fixed,
                           models={"ladder": ["richardson_lucy"]})
    done = rqml("run", str(write_yaml(tmp_path / "p.yaml", config)), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^tasks\s+128 \(128 accepted\)", done.stdout, re.M), done.stdout
    assert "warning" not in done.stderr
    group = zarr.open_group(out, mode="r")
    assert group.attrs["rqml"]["status"] == "complete" and len(FinishedRun.open(out).outcomes) == 128
    result = group["deconvolved"][...]
    assert np.isfinite(result).all() and (result.reshape(4, 8, 4, 16, 8, 16).max(axis=(1, 3, 5)) > 0).all()  # every tile written
    png, report = tmp_path / "out.png", tmp_path / "out.report.html"
    assert png.read_bytes().startswith(b"\x89PNG") and f"slices       {png}" in done.stdout
    assert report.stat().st_size > 0 and f"report       {report}" in done.stdout
    again = rqml("run", str(tmp_path / "p.yaml"), "--no-progress")  # every record checked in the client
    assert again.returncode == 0, again.stderr
    assert "cluster      none started" in again.stderr and "128 reused from an earlier run" in again.stdout
    assert np.array_equal(zarr.open_group(out, mode="r")["deconvolved"][...], result)
