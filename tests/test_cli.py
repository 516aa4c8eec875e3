"""The `rqml` command as a user runs it: real subprocesses, an embedded cluster, Zarr on disk."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import TESTS, paced_pipeline_dict, pipeline_dict, write_yaml
from timing import bound

pytestmark = pytest.mark.slow


def rqml(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """``rqml ARGS``, with the tests' models importable."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run(
        [sys.executable, "-m", "rqml_dask.cli", *args], capture_output=True, text=True, timeout=bound(240), cwd=cwd, env=env
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
    # the halo it reads, and that it is what the PSF needs (pipeline_dict's halo: auto)
    assert re.search(r"^halo\s+\(\d+, \d+, \d+\) voxels per side \(auto: what this psf needs for up to \d+ iterations\)$",
                     done.stderr, re.M), done.stderr
    # what a tile computes on (its FFTs' shape), and how many times its core's 10x20x20 voxels
    transform = re.search(r"^transform\s+a tile computes on \((\d+), (\d+), (\d+)\): ([\d.]+)x its core's voxels$", done.stderr, re.M)
    assert transform, done.stderr
    shape = [int(v) for v in transform.groups()[:3]]
    assert all(n > t for n, t in zip(shape, (10, 20, 20))) and float(transform[4]) == round(np.prod(shape) / (10 * 20 * 20), 2)
    assert re.search(r"^tasks\s+8 \(", done.stdout, re.M)
    errors = re.search(r"error vs truth \(relative RMSE\): input ([\d.]+) -> output ([\d.]+)", done.stdout)
    assert errors and float(errors[2]) < float(errors[1])
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "complete"


def test_the_shipped_linear_solve_pipeline_generates_its_systems_and_solves_them(tmp_path):
    """``rqml run pipelines/linear_solve.yaml`` as a user runs it, from a directory of their own."""
    done = rqml("run", str(Path(__file__).parents[1] / "pipelines" / "linear_solve.yaml"), "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^tasks\s+8 \(8 accepted\)", done.stdout, re.M), done.stdout
    assert re.search(r"^escalations\s+16$", done.stdout, re.M)  # every task: Jacobi -> CG -> mixed precision
    error = re.search(r"error vs truth \(relative RMSE\): input 1 -> output (\S+)", done.stdout)
    assert error and float(error[1]) < 1e-8
    assert zarr.open_group(tmp_path / "results" / "linear_solve.zarr", mode="r").attrs["rqml"]["status"] == "complete"


@pytest.mark.parametrize("args, expected", [
    (["--help"], "iterative-refinement pipelines on Dask"),
    (["--version"], "version"),
    (["run", "{bad}"], "not valid YAML"),
    (["run", "{unknown}"], "unknown_section"),
])
def test_help_version_and_a_bad_pipeline_file_answer_without_loading_dask(tmp_path, args, expected):
    (tmp_path / "bad.yaml").write_text("name: [\n")
    (tmp_path / "unknown.yaml").write_text("name: x\nunknown_section: 1\n")
    args = [a.format(bad=tmp_path / "bad.yaml", unknown=tmp_path / "unknown.yaml") for a in args]
    probe = ("import sys; from rqml_dask.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('dask loaded' if 'distributed' in sys.modules or 'dask' in sys.modules else 'no dask', file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=bound(60))
    assert expected in done.stdout + done.stderr
    assert done.stderr.strip().endswith("no dask"), done.stderr


def test_the_progress_bar_shows_iterations_before_the_first_task_finishes(tmp_path, small_volume):
    config = paced_pipeline_dict(small_volume, tmp_path / "out.zarr", iterations=120)
    done = rqml("run", str(write_yaml(tmp_path / "p.yaml", config)), "--progress")
    assert done.returncode == 0, done.stderr
    before_the_end = [int(n) for n in re.findall(r"0/1 \[[^\]]*iterations=(\d+)", done.stderr)]
    assert before_the_end and max(before_the_end) > 0, done.stderr  # the one task still running, its iterations counted


def test_synth_systems_writes_a_batch_for_linear_solve(tmp_path):
    store = tmp_path / "systems.zarr"
    done = rqml("data", "synth", str(store), "--kind", "systems", "--grid", "8,10,12", "--count", "3", "--contrast", "50")
    assert done.returncode == 0, done.stderr
    group = zarr.open_group(store, mode="r")
    assert {k: group[k].shape for k in group.keys()} == {"rhs": (3, 8, 10, 12), "coefficients": (3, 3, 8, 10, 12), "truth": (3, 8, 10, 12)}
    k = group["coefficients"][...]
    assert 1 <= k[:, 0].max() / k[:, 0].min() <= 50 + 1e-9
    assert rqml("data", "synth", str(store), "--kind", "systems", "--grid", "8").returncode != 0  # exists, refused


def test_bad_pipeline_is_refused_before_any_cluster_starts(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text("name: x\ninput: {store: nowhere.zarr}\noutput: {store: o.zarr}\ntiling: {tile: [8]}\nmodels: {ladder: [richardson_lucy]}\nconvergence: {check_every: -1}\n")
    done = rqml("run", str(config))
    assert done.returncode == 1
    assert f"{config}: 1 invalid setting(s):" in done.stderr
    assert "convergence.check_every: Input should be greater than 0 (got -1)" in done.stderr
    assert "dashboard" not in done.stderr


FIXED = {"max_iterations": 20, "check_every": 5, "stability_tol": 0, "consistency_tol": 0, "novelty_window": 1000}
NOT_ACCEPTED = {
    # every model stalls: a stability no model reaches, a progress bar none keeps up with
    "stalled": {"convergence": {"max_iterations": 300, "check_every": 5, "stability_tol": 1e-12, "novelty_window": 10, "min_progress": 0.5}},
    "max_iterations": {"convergence": FIXED},  # not converged, and the pipeline does not accept that
    "rejected": {"convergence": {**FIXED, "accept_max_iterations": True}, "validation": {"max_misfit": 1e-9}},
    "failed": {"convergence": {**FIXED, "accept_max_iterations": True}, "models": {"ladder": ["raising_model:RaisingModel"]},
               "plugins": [str(TESTS / "raising_model.py")]},
}


@pytest.fixture(scope="module")
def scheduler_address():
    from heterogeneous_cluster import heterogeneous_cluster

    with heterogeneous_cluster([1.0, 1.0]) as cluster:
        yield cluster.scheduler_address


@pytest.mark.parametrize("state", [*NOT_ACCEPTED, "terminated"])
def test_a_run_with_a_task_not_accepted_exits_non_zero_names_it_and_leaves_the_output_not_complete(
    tmp_path, small_volume, scheduler_address, state
):
    from distributed import Client

    settings = {"models": {"ladder": ["richardson_lucy"]}, "tiling": {"tile": [24, 48, 48]}, **NOT_ACCEPTED.get(state, {})}
    if state == "terminated":  # the operator's policy ends tasks refining longer than a second
        settings.update(models={"ladder": ["sleepy_model:SleepyModel"]}, convergence={**FIXED, "max_iterations": 10**6},
                        plugins=[str(TESTS / "sleepy_model.py")])
        with Client(scheduler_address) as client:
            client.sync(client.scheduler.rqml_policy, policy={"version": 2, "max_task_seconds": 1.0})
    config = write_yaml(tmp_path / "p.yaml", pipeline_dict(small_volume, tmp_path / "out.zarr", **settings))
    done = rqml("run", str(config), "--scheduler", scheduler_address, "--no-progress")
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(rf"^tasks\s+1 \(1 {state}\)$", done.stdout, re.M), done.stdout
    assert re.search(rf"^  test/0: {state}\b.*; to do: ", done.stdout, re.M), done.stdout
    reason = {"terminated": "exceeded max_task_seconds=1", "failed": "RuntimeError: a bug in the model",
              "rejected": "above max_misfit", "stalled": "stalled on every model"}.get(state, "")
    assert reason in done.stdout, done.stdout
    assert "1 of 1 task(s) not accepted" in done.stderr
    attrs = zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]
    assert attrs["status"] == "rejected" and attrs["rejected"] == {"test/0": state}


def test_an_input_regenerated_in_place_is_computed_again_and_a_run_writing_elsewhere_reuses_everything(tmp_path):
    store = tmp_path / "vol.zarr"
    synth = ["data", "synth", str(store), "--shape", "20,40,40", "--psf-sigma", "1.5,1,1"]
    assert rqml(*synth, "--seed", "3").returncode == 0

    def pipeline(name: str, out: str, **overrides) -> Path:
        config = pipeline_dict(store, tmp_path / out, tiling={"tile": [10, 20, 20]}, **overrides)
        del config["checkpoint"]["artifacts"]  # the default: beside the input, whatever the output
        return write_yaml(tmp_path / name, config)

    result = lambda out: zarr.open_group(tmp_path / out, mode="r")["deconvolved"][...]  # noqa: E731
    config = pipeline("p.yaml", "out.zarr")
    assert rqml("run", str(config), "--no-progress").returncode == 0
    # another output, another priority and cluster size: nothing that changes the result
    moved = rqml("run", str(pipeline("moved.yaml", "moved.zarr", tasks={"priority": 5}, cluster={"n_workers": 1})), "--no-progress")
    assert moved.returncode == 0 and re.search(r"8 reused from an earlier run", moved.stdout), moved.stdout + moved.stderr
    assert (result("moved.zarr") == result("out.zarr")).all()
    assert zarr.open_group(tmp_path / "moved.zarr", mode="r").attrs["rqml"]["status"] == "complete"

    refused = rqml(*synth, "--seed", "4")  # the same path: refused without --overwrite
    assert refused.returncode == 1 and f"{store} exists: pass --overwrite to replace it" in refused.stderr
    assert rqml(*synth, "--seed", "4", "--overwrite").returncode == 0  # other content, same path and metadata
    again = rqml("run", str(config), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert re.search(r"0 reused from an earlier run", again.stdout), again.stdout
    fresh = pipeline_dict(store, tmp_path / "fresh.zarr", tiling={"tile": [10, 20, 20]})  # checkpoints of its own
    assert rqml("run", str(write_yaml(tmp_path / "fresh.yaml", fresh)), "--no-progress").returncode == 0
    assert (result("out.zarr") == result("fresh.zarr")).all()  # what a fresh run on the new data gives

    unchanged = rqml("run", str(config))  # nothing changed but the progress bar: all reused
    assert unchanged.returncode == 0 and re.search(r"8 reused from an earlier run", unchanged.stdout), unchanged.stdout
    assert (result("out.zarr") == result("fresh.zarr")).all()


def test_an_output_of_another_configuration_or_a_file_is_refused_before_any_cluster_starts(tmp_path, small_volume):
    out = tmp_path / "out.zarr"
    first = write_yaml(tmp_path / "a.yaml", pipeline_dict(small_volume, out, tiling={"tile": [24, 48, 48]}))
    assert rqml("run", str(first), "--no-progress").returncode == 0
    before = zarr.open_group(out, mode="r")["deconvolved"][...]
    other = write_yaml(tmp_path / "b.yaml", pipeline_dict(small_volume, out, tiling={"tile": [12, 24, 24]}))
    refused = rqml("run", str(other), "--no-progress")
    assert refused.returncode == 1 and "dashboard" not in refused.stderr  # no cluster started
    assert f"output {out} was written by another pipeline configuration: pass --overwrite" in refused.stderr
    assert (zarr.open_group(out, mode="r")["deconvolved"][...] == before).all()  # nothing lost
    assert zarr.open_group(out, mode="r").attrs["rqml"]["status"] == "complete"
    assert rqml("run", str(other), "--no-progress", "--overwrite").returncode == 0
    (tmp_path / "file.zarr").write_text("not a group")
    on_file = write_yaml(tmp_path / "c.yaml", pipeline_dict(small_volume, tmp_path / "file.zarr"))
    refused = rqml("run", str(on_file), "--no-progress")
    assert refused.returncode == 1 and "exists and is not a Zarr group (a file)" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_negative_input_fails_the_run_in_one_line_naming_where(tmp_path, small_volume):
    import shutil

    store = tmp_path / "in.zarr"
    shutil.copytree(small_volume, store)
    zarr.open_group(store, mode="r+")["observed"][3, 4, 5] = -0.5  # over-subtracted background
    config = write_yaml(tmp_path / "p.yaml", pipeline_dict(store, tmp_path / "out.zarr"))
    done = rqml("run", str(config), "--no-progress")
    assert done.returncode == 1
    # the node's error, on one line of rqml's own (Dask's worker log above it is Dask's)
    assert re.search(rf"^Error: task test/\d+ failed: {re.escape(str(store))}::observed has 1 negative value\(s\) in \[.*\], "
                     r"the lowest -0.5 at \(3, 4, 5\)", done.stderr, re.M), done.stderr
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "incomplete"
