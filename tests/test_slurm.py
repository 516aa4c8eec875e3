"""Pipelines whose nodes are jobs of a real Slurm (one host: munged, slurmctld, slurmd;
:mod:`slurm_server`), started by ``rqml run`` through dask-jobqueue."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import EngineCase, write_yaml
from slurm_server import OneHostSlurm, unavailable
from test_checkpoint_recovery import lmdb_entries
from test_degraded_mode import checkpointed
from timing import bound, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    with OneHostSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def slurm_section(tmp_path: Path, **extra) -> dict:
    """The pipeline's ``cluster.slurm``: one core per job, everything bound to loopback."""
    return {"cores": 1, "memory": "1GiB", "interface": "lo", "local_directory": str(tmp_path / "jobs"),
            "log_directory": str(tmp_path / "logs"), **extra}


def node_of_job(logs: Path, job: str) -> str | None:
    """The node a job ran, from what its node wrote to the job's stderr."""
    found = _said(logs, job)
    return found[1] if found else None


def http_port_of_job(logs: Path, job: str) -> int | None:
    """The port of the HTTP server (``/checkpoint_state``, ...) of the node a job runs."""
    found = _said(logs, job)
    return int(found[2]) if found else None


def _said(logs: Path, job: str) -> re.Match | None:
    err = logs / f"rqml-node-{job}.err"
    return re.search(r"rqml: node (\S+)'s HTTP server \(.*\) listens on 127\.0\.0\.1:(\d+)", err.read_text()) if err.exists() else None


def test_a_cancelled_slurm_job_is_submitted_again_under_its_name_and_the_result_is_bit_identical_to_a_local_run(tmp_path, slurm, small_volume):
    case = EngineCase("deconvolution", small_volume, "deconvolved", "sleepy_model:SleepyModel")
    config = case.pipeline(tmp_path / "out.zarr", tasks=8, iterations=100, delay=0.04)
    config["cluster"] = {**config["cluster"], "kind": "slurm", "slurm": slurm_section(tmp_path, jobs=2)}
    node_db = tmp_path / "out.zarr.checkpoints" / "nodes" / f"{os.uname().nodename}.lmdb"
    env = {**slurm.environ, "DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "1s"}  # Dask gives a lost job up after 1 s
    run = subprocess.Popen([sys.executable, "-m", "rqml_dask.cli", "run", str(write_yaml(tmp_path / "p.yaml", config)), "--no-progress"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: len(slurm.jobs()) == 2 and lmdb_entries(node_db, b"done") >= 1, timeout=bound(120), interval=0.1,
                 what="two node jobs running and one task done")

        def refining_with_a_checkpoint() -> str | None:
            """A job whose node holds a task checkpointed at least 20 iterations before its end."""
            for job in slurm.jobs():
                port = http_port_of_job(tmp_path / "logs", job)
                if port is not None and any(10 <= i <= 80 for i in checkpointed(port).values()):
                    return job
            return None

        cancelled = wait_for(refining_with_a_checkpoint, timeout=bound(60), interval=0.05, what="a node refining a checkpointed task")
        slurm.cancel(cancelled)
        out, err = run.communicate(timeout=bound(300))
    finally:
        run.kill()
    print(out)  # the summary: pytest -s shows its counts
    assert run.returncode == 0, out + err
    recovered = re.search(r"recovered\s+(\d+) resumed from checkpoints", out)
    assert recovered and int(recovered[1]) >= 1, out  # the cancelled node's task went on from its checkpoint
    assert re.search(r"^iterations\s+800 ", out, re.M), out  # 8 tasks x 100, counted once each
    assert re.search(r"^tasks\s+8 \(8 accepted\)", out, re.M), out
    # the cancelled job's node came back as a new job under the same name
    logs = tmp_path / "logs"
    jobs = sorted({p.name.split("-")[-1].split(".")[0] for p in logs.glob("rqml-node-*.err")}, key=int)
    assert len(jobs) == 3 and cancelled in jobs, jobs
    name = node_of_job(logs, cancelled)
    assert name is not None and name == node_of_job(logs, jobs[-1]), {j: node_of_job(logs, j) for j in jobs}
    assert f"node {name}: its job ended while the cluster still wants it" in err, err
    assert "ended before the node started" not in err, err  # its node had started: a lost node, not a failed start
    wait_for(lambda: slurm.jobs() == [], what="rqml run's jobs cancelled when it ended")
    # the same pipeline on the embedded cluster, uninterrupted, with checkpoints of its own: the same bits
    local = {**config, "output": {**config["output"], "store": str(tmp_path / "local.zarr")},
             "checkpoint": {**config["checkpoint"], "artifacts": str(tmp_path / "local.checkpoints")},
             "cluster": {**config["cluster"], "kind": "local"}}
    done = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "run", str(write_yaml(tmp_path / "local.yaml", local)), "--no-progress"],
                          capture_output=True, text=True, timeout=bound(300))
    assert done.returncode == 0, done.stdout + done.stderr
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "out.zarr", mode="r")[case.output_array][...],
                                  zarr.open_group(tmp_path / "local.zarr", mode="r")[case.output_array][...])


def test_an_adaptive_slurm_cluster_starts_from_no_job_and_ends_with_every_task_accepted(tmp_path, slurm, small_volume):
    case = EngineCase("deconvolution", small_volume, "deconvolved", "sleepy_model:SleepyModel")
    config = case.pipeline(tmp_path / "out.zarr", tasks=8, iterations=30, delay=0.01)
    config["cluster"] = {**config["cluster"], "slurm": slurm_section(tmp_path, adapt={"minimum": 0, "maximum": 2})}
    done = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "run", str(write_yaml(tmp_path / "p.yaml", config)),
                           "--no-progress", "--cluster", "slurm"], capture_output=True, text=True, env=slurm.environ, timeout=bound(300))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "none yet: jobs are submitted as the work asks (adapt)" in done.stderr, done.stderr
    assert re.search(r"^tasks\s+8 \(8 accepted\)", done.stdout, re.M), done.stdout
    assert 1 <= len(list((tmp_path / "logs").glob("rqml-node-*.err"))) <= 2  # jobs submitted as work waited, at most the maximum


def test_secure_slurm_jobs_each_present_their_own_node_certificate_and_every_result_is_signed(tmp_path, slurm, small_volume):
    case = EngineCase("deconvolution", small_volume, "deconvolved", "sleepy_model:SleepyModel")
    config = case.pipeline(tmp_path / "out.zarr", tasks=8, iterations=20, delay=0.0)
    credentials = tmp_path / "credentials"
    config["cluster"] = {**config["cluster"], "slurm": slurm_section(tmp_path, jobs=2, credentials_directory=str(credentials))}
    env = {**slurm.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}  # the user's Central Authority, made on first use
    done = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "run", str(write_yaml(tmp_path / "p.yaml", config)),
                           "--no-progress", "--cluster", "slurm", "--secure"], capture_output=True, text=True, env=env, timeout=bound(300))
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^secure\s+pqtls://127\.0\.0\.1:\d+: certificate scheduler, key exchange X25519MLKEM768$", done.stderr, re.M), done.stderr
    assert re.search(r"^tasks\s+8 \(8 accepted\)", done.stdout, re.M), done.stdout  # the client verified each signature
    scripts = list(credentials.glob("run-*"))
    assert scripts == [], scripts  # the run's credentials are gone with it
    logs = tmp_path / "logs"
    names = sorted(filter(None, (node_of_job(logs, p.name.split("-")[-1].split(".")[0]) for p in logs.glob("rqml-node-*.err"))))
    assert names == ["node-0", "node-1"], names


def test_jobs_whose_node_cannot_start_fail_the_run_naming_the_job_output_instead_of_waiting_for_ever(tmp_path, slurm, small_volume):
    case = EngineCase("deconvolution", small_volume, "deconvolved", "sleepy_model:SleepyModel")
    config = case.pipeline(tmp_path / "out.zarr", tasks=8, iterations=20, delay=0.0)
    config["cluster"] = {**config["cluster"], "slurm": slurm_section(tmp_path, jobs=2, python=str(tmp_path / "no-such-python"))}
    done = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "run", str(write_yaml(tmp_path / "p.yaml", config)),
                           "--no-progress", "--cluster", "slurm"], capture_output=True, text=True, env=slurm.environ, timeout=bound(300))
    assert done.returncode == 1, done.stdout + done.stderr
    said = re.search(r"^Error: task \S+ failed: (\d+) slurm jobs in a row ended before their node started; the latest, "
                     r"job (\d+) of node (node-\d), says why in (\S+\.err) \(output left marked incomplete", done.stderr, re.M)
    assert said and int(said[1]) >= 3, done.stderr
    assert "no-such-python" in Path(said[4]).read_text()  # the file named holds the reason
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "incomplete"
    wait_for(lambda: slurm.jobs() == [], what="rqml run's jobs cancelled when it ended")
