"""Model families a user writes in a file and names in the pipeline: shipped, checked, run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr
from distributed import Client

from rqml_dask import Pipeline
from rqml_dask.pipeline import PipelineConfigError, PipelineError
from rqml_dask.pipeline.plugins import available_models

from conftest import TESTS, local_cluster, pipeline_dict, write_yaml
from timing import bound, wait_for

FAMILY = (TESTS.parent / "pipelines" / "my_models.py").read_text()
"""The README's model family ("Writing a model family"), the file pipelines/van_cittert.yaml ships."""

MODEL = "my_models:VanCittert"
FIXED = {"max_iterations": 20, "check_every": 5, "stability_tol": 0, "consistency_tol": 0, "novelty_window": 1000,
         "accept_max_iterations": True}


def family_pipeline(tmp_path, store, family: str = FAMILY, delay: float = 0.0, **overrides) -> dict:
    (tmp_path / "family").mkdir(exist_ok=True)
    (tmp_path / "family" / "my_models.py").write_text(family)
    config = pipeline_dict(store, tmp_path / "out.zarr", models={"ladder": [MODEL], "params": {MODEL: {"delay": delay}}},
                           convergence=FIXED, **overrides)
    return {**config, "plugins": ["family/my_models.py"]}  # relative to the pipeline file


@pytest.fixture(autouse=True)
def forget_the_family():
    """Each test writes its own my_models.py: none sees another's module."""
    yield
    sys.modules.pop("my_models", None)


@pytest.mark.slow
def test_a_family_from_a_file_runs_on_a_cluster_without_install_even_on_a_worker_that_joins_later(tmp_path, small_volume):
    config = family_pipeline(tmp_path, small_volume, delay=0.05)  # 8 tasks of about 1 s
    pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config))
    with local_cluster(n_workers=1) as cluster, Client(cluster) as client:
        first = set(client.scheduler_info()["workers"])
        futures = pipeline.submit(client)
        wait_for(lambda: any(f.done() for f in futures), what="a first task done")
        cluster.scale(2)  # a worker that knew nothing of the family when the run began
        client.wait_for_workers(2, timeout=bound(60))
        late = (set(client.scheduler_info()["workers"]) - first).pop()
        outcomes = client.gather(futures)
        shipped = client.run(lambda: sys.modules["my_models"].__file__, workers=[late])[late]
        listed = client.run(available_models, workers=[late])[late]
    assert all(o.accepted and [run.model for run in o.models] == [MODEL] for o in outcomes)
    assert any(o.node == late for o in outcomes)  # the late worker refined with it
    assert "dask-scratch-space" in shipped or "worker-" in shipped  # uploaded into its local directory
    assert listed[MODEL] == {"task_class": "deconvolution", "family": "van_cittert"}
    result = zarr.open_group(tmp_path / "out.zarr", mode="r")["deconvolved"][...]
    assert np.isfinite(result).all() and result.min() >= 0


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda f: f.replace("    def misfit(self):", "    def misfit_(self):"), r"lacks the required method\(s\) misfit"),
        (lambda f: f.replace("self.blur(self._x)), 0.0)", "self.blur(self._x)), 0.0)[1:]"),
         r"after step\(\) the estimate has shape \(7, 12, 12\) and dtype float32; the deconvolution probe problem needs shape \(8, 12, 12\)"),
        (lambda f: f.replace("self._x = self.xp.maximum(self._x + self.beta * (self.image - self.blur(self._x)), 0.0)",
                             "self._x = self.xp.astype(self._x, self.xp.float64)"), "dtype float64"),
        (lambda f: f.replace("time.sleep(self.delay)", "raise RuntimeError('boom')"), r"in step\(\): RuntimeError: boom"),
        (lambda f: f.replace('task_class = "deconvolution"', 'task_class = "linear_solve"'),
         "is for task class 'linear_solve', not 'deconvolution'"),
        (lambda f: f + "\nimport not_a_module\n", "does not import: ModuleNotFoundError"),
    ],
    ids=["missing method", "wrong shape", "wrong dtype", "raises", "other task class", "import error"],
)
def test_a_broken_family_is_refused_with_its_name_before_any_task_starts(tmp_path, small_volume, change, complaint):
    path = write_yaml(tmp_path / "p.yaml", family_pipeline(tmp_path, small_volume, family=change(FAMILY)))
    with pytest.raises(PipelineConfigError, match=complaint) as refused:
        Pipeline.from_yaml(path)
    assert str(path) in str(refused.value) and ("my_models" in str(refused.value))
    assert not (tmp_path / "out.zarr").exists()


def test_a_plugin_that_is_no_python_file_or_package_is_refused(tmp_path, small_volume):
    config = {**family_pipeline(tmp_path, small_volume), "plugins": ["family/missing.py"]}
    with pytest.raises(PipelineConfigError, match=r"plugins: .*family/missing\.py does not exist"):
        Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", config))


@pytest.mark.slow
def test_changed_family_code_is_computed_again_and_rqml_models_lists_the_cluster(tmp_path, small_volume, client):
    path = write_yaml(tmp_path / "p.yaml", family_pipeline(tmp_path, small_volume, tiling={"tile": [24, 48, 48]}))
    first = Pipeline.from_yaml(path).run(client, progress=False)
    again = Pipeline.from_yaml(path).run(client, progress=False)
    assert [o.reused for o in again.outcomes] == [True]  # same code, same input: reused
    (tmp_path / "family" / "my_models.py").write_text(FAMILY.replace("beta=1.0", "beta=0.5"))
    with pytest.raises(PipelineError, match="written by another pipeline configuration"):
        Pipeline.from_yaml(path).run(client, progress=False)  # other code: the output is not this pipeline's now
    changed = Pipeline.from_yaml(path).run(client, progress=False, overwrite=True)
    assert [o.reused for o in changed.outcomes] == [False]  # the code that made it changed: computed again
    assert changed.outcomes[0].result_digest != first.outcomes[0].result_digest

    listing = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "models", "--scheduler", client.scheduler.address,
                              "--pipeline", str(path)], capture_output=True, text=True, timeout=bound(120))
    assert listing.returncode == 0, listing.stderr
    workers = client.scheduler_info()["workers"]
    for address in workers:
        block = listing.stdout.split(address, 1)[1].split("tcp://", 1)[0]
        lines = {line.split()[0]: line.split()[1:] for line in block.strip().splitlines()}
        assert lines[MODEL] == ["deconvolution", "van_cittert"]
        assert lines["mixed_precision"] == ["linear_solve", "mixed_precision"]
        assert lines["richardson_lucy"] == ["deconvolution", "richardson_lucy"]


def test_rqml_run_says_which_models_the_held_out_rule_cannot_check(tmp_path, small_volume, client):
    """A family without ``prediction()`` in a ladder, on photon counts: ``rqml run`` says the
    held-out rule and the guard do not check it; for the README family, which has it, nothing."""
    blind = FAMILY.replace("    def prediction(self):", "    def _no_prediction(self):")
    assert blind != FAMILY
    said = {}
    for name, family in (("readme", FAMILY), ("blind", blind)):
        (tmp_path / name).mkdir()
        config = family_pipeline(tmp_path / name, small_volume, family)
        config["convergence"]["held_out_fraction"] = 0.2  # photon counts held out: the rule is on
        done = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "run", str(write_yaml(tmp_path / name / "p.yaml", config)),
                               "--scheduler", client.scheduler.address, "--no-progress"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=bound(300))
        assert any(line.startswith("halo ") for line in done.stderr.splitlines()), done.stderr[-2000:]  # the notes were printed
        said[name] = [line for line in done.stderr.splitlines() if line.startswith("held-out")]
    assert said["readme"] == []
    assert said["blind"] == ["held-out     not for my_models:VanCittert: without prediction() (the data its estimate predicts) "
                             "neither the held-out stopping rule nor the guard against results worse than the input checks it "
                             "(README: Writing a model family)"]


def test_the_readme_family_is_this_one():
    """The README's "Writing a model family" example is the family these tests run."""
    assert FAMILY in (TESTS.parent / "README.md").read_text()


@pytest.mark.slow
def test_a_family_in_a_package_directory_is_shipped_zipped_and_runs(tmp_path, small_volume, client):
    package = tmp_path / "family" / "my_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from my_pkg.van_cittert import VanCittert\n")
    (package / "van_cittert.py").write_text(FAMILY)
    config = pipeline_dict(small_volume, tmp_path / "out.zarr", models={"ladder": ["my_pkg:VanCittert"]},
                           convergence=FIXED, tiling={"tile": [24, 24, 48]})
    path = write_yaml(tmp_path / "p.yaml", {**config, "plugins": ["family/my_pkg"]})
    try:
        report = Pipeline.from_yaml(path).run(client, progress=False)
        shipped = client.run(lambda: sys.modules["my_pkg"].__file__)
    finally:
        for name in ("my_pkg", "my_pkg.van_cittert"):
            sys.modules.pop(name, None)
    assert len(report.outcomes) == 2 and not report.rejected
    assert all(o.models[0].model == "my_pkg:VanCittert" for o in report.outcomes)
    assert all(".zip" in where for where in shipped.values())  # imported from the uploaded archive


def test_a_worker_that_dies_while_a_plugin_is_shipped_to_it_does_not_fail_the_shipping(tmp_path, caplog):
    """The scheduler hands a plugin to each worker; one that dies in the middle of it (here:
    stopped, then killed) breaks the client's call (the scheduler drops the client's
    connection on a worker's closed one). The plugin is shipped again, to the worker left."""
    import logging
    import os
    import signal
    import threading

    from rqml_dask.pipeline.plugins import ship_plugins

    from dask_processes import dask_scheduler, node_worker
    from etcd_server import free_port

    (tmp_path / "my_models.py").write_text(FAMILY)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    with (dask_scheduler(port, tmp_path / "scheduler.log"),
          node_worker(address, "alive", tmp_path / "alive.log"),
          node_worker(address, "dying", tmp_path / "dying.log") as dying,
          Client(address, timeout=bound(60)) as client):
        client.wait_for_workers(2, timeout=bound(60))
        os.kill(dying.process.pid, signal.SIGSTOP)  # still registered, answers nothing
        threading.Timer(1.0, os.kill, (dying.process.pid, signal.SIGKILL)).start()
        with caplog.at_level(logging.WARNING, logger="rqml_dask.pipeline.plugins"):
            ship_plugins(client, [tmp_path / "my_models.py"])
        assert "shipping the plugin" in caplog.text and "again" in caplog.text  # the first call did break
        names = {info["name"] for info in client.scheduler_info()["workers"].values()}
        loaded = client.run(lambda: "my_models" in sys.modules)
    assert names == {"alive"} and list(loaded.values()) == [True]
