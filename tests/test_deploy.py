"""Where a pipeline runs (``cluster.kind``, ``rqml run --cluster``): the schema, the job
scripts dask-jobqueue submits, and scaling down that spares nodes holding refining tasks.
The Slurm runs themselves are in tests/test_slurm.py, Kubernetes in tests/test_kubernetes.py."""

from __future__ import annotations

import re

import pytest
from distributed import Client

from rqml_dask import Pipeline
from rqml_dask.deploy.jobqueue import cluster_class, cluster_options
from rqml_dask.pipeline.config import JobQueueSpec

from conftest import EngineCase, local_cluster, write_yaml
from test_cli import rqml
from test_pipeline_config import refused
from timing import gather, wait_for


def test_cluster_kinds_are_checked_with_the_key_that_is_wrong(tmp_path):
    base = {"name": "t", "input": {"store": str(tmp_path / "in.zarr")}, "output": {"store": str(tmp_path / "o.zarr")},
            "tiling": {"tile": [8, 8, 8]}, "models": {"ladder": ["richardson_lucy"]}}
    assert "cluster: Value error, kind 'address' needs the scheduler's address" in refused(tmp_path, {**base, "cluster": {"kind": "address"}})
    assert "cluster.kind: Input should be 'local', 'slurm', 'pbs', 'kubernetes' or 'address'" in refused(tmp_path, {**base, "cluster": {"kind": "lsf"}})
    bad_adapt = refused(tmp_path, {**base, "cluster": {"slurm": {"adapt": {"minimum": 4, "maximum": 2}}}})
    assert "cluster.slurm.adapt: Value error, adapt.minimum (4) is more than adapt.maximum (2)" in bad_adapt
    assert "cluster.pbs.cores: Input should be greater than 0" in refused(tmp_path, {**base, "cluster": {"pbs": {"cores": 0}}})


def test_run_refuses_a_scheduler_with_a_cluster_to_start_and_secure_kubernetes_in_one_line(tmp_path):
    both = rqml("run", "pipelines/quickstart.yaml", "--scheduler", "tcp://127.0.0.1:1", "--cluster", "slurm")
    assert both.returncode == 1 and both.stderr.strip() == "Error: give --scheduler (a running cluster) or --cluster (one to start), not both", both.stderr
    secure = rqml("run", "pipelines/quickstart.yaml", "--cluster", "kubernetes", "--secure")
    assert secure.returncode == 1 and "Kubernetes pods take theirs from a Secret (cluster.kubernetes.trust_secret)" in secure.stderr, secure.stderr
    unknown = rqml("run", "pipelines/quickstart.yaml", "--cluster", "lsf")
    assert unknown.returncode != 0 and "'lsf' is not one of 'local', 'slurm', 'pbs', 'kubernetes'" in unknown.stderr, unknown.stderr


@pytest.mark.parametrize("kind, directive", [("slurm", "#SBATCH"), ("pbs", "#PBS")])
def test_a_job_script_starts_one_named_node_with_the_preloads_and_the_worker_settings(kind, directive):
    jobs = JobQueueSpec(cores=4, memory="16GiB", queue="gpu", account="lab", job_extra_directives=["--extra-directive"],
                        job_script_prologue=["module load cuda"], interface="lo", local_directory="$TMPDIR")
    with cluster_class(kind)(**cluster_options(jobs, "127.0.0.1:0")) as cluster:
        script = cluster.job_script()
        scheduler_preloads = cluster.scheduler.preloads
        assert cluster._new_worker_name(3) == "node-3"
    assert f"{directive} -N rqml-node" in script or f"{directive} -J rqml-node" in script, script
    assert f"{directive} --extra-directive" in script and "gpu" in script and "lab" in script
    lines = script.splitlines()
    command = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert "--worker-class rqml_dask.node.RQMLWorker --preload rqml_dask.node" in command
    assert "--nthreads 4 " in command and "--memory-limit 16.00GiB" in command and "--local-directory $TMPDIR" in command
    assert "--interface lo" in command and "--nworkers" not in command  # one node per job
    exports = lines[lines.index("export MALLOC_TOP_PAD_=268435456"):lines.index(command)]
    assert exports == ["export MALLOC_TOP_PAD_=268435456", "export MALLOC_ARENA_MAX=1",
                       "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False", "module load cuda"]
    assert [p.name for p in scheduler_preloads] == ["rqml_dask.scheduler"]


def test_gpu_jobs_start_dask_cuda_worker():
    with cluster_class("slurm")(**cluster_options(JobQueueSpec(gpu=True, interface="lo"), "127.0.0.1:0")) as cluster:
        script = cluster.job_script()
    assert "-m dask_cuda.cli worker tcp://" in script and "--worker-class rqml_dask.node.RQMLWorker" in script, script


@pytest.mark.slow
def test_scaling_down_spares_every_node_holding_a_refining_task(tmp_path, small_volume):
    case = EngineCase("deconvolution", small_volume, "deconvolved", "sleepy_model:SleepyModel")
    pipeline = Pipeline.from_yaml(write_yaml(tmp_path / "p.yaml", case.pipeline(tmp_path / "out.zarr", tasks=4, iterations=60, delay=0.03)))

    def retirable(dask_scheduler) -> tuple[list[str], list[str]]:
        """What Dask may retire (``valid_workers_downscaling`` of every plugin), and the nodes holding tasks."""
        plugin = dask_scheduler.plugins["rqml-scheduler"]
        candidates = plugin.valid_workers_downscaling(dask_scheduler, list(dask_scheduler.workers.values()))
        return sorted(ws.address for ws in candidates), sorted(a for a, node in plugin.nodes.items() if node.bound)

    with local_cluster() as cluster, Client(cluster) as client:
        futures = pipeline.submit(client)
        both_busy = wait_for(lambda: (r := client.run_on_scheduler(retirable)) and len(r[1]) == 2 and r, what="both nodes refining")
        assert both_busy[0] == []  # neither may go
        assert not client.sync(client.scheduler.workers_to_close, n=2)  # nor does Dask pick one to close
        gather(client, futures, timeout=120)
        idle = wait_for(lambda: (r := client.run_on_scheduler(retirable)) and not r[1] and r, what="the nodes idle")
        assert len(idle[0]) == 2  # once idle, both may


def test_a_kubernetes_cluster_that_cannot_start_as_asked_is_one_line():
    done = rqml("run", "pipelines/quickstart.yaml", "--cluster", "kubernetes")  # n_workers 2 is fine; no Kubernetes here
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: the Dask operator did not start cluster 'rqml': "), done.stderr
    assert "Kubernetes credentials" in done.stderr


@pytest.mark.parametrize("walltime, hours", [("01:00:00", 1.0), ("00:30:00", 0.5), ("2-12:00:00", 60.0), ("90", 1.5),
                                             ("10:30", 0.175), ("1-06", 30.0), ("nonsense", 24.0)])
def test_a_secure_job_node_certificate_lasts_its_walltime_read_in_slurm_and_pbs_forms(walltime, hours):
    from rqml_dask.deploy.jobqueue import _hours

    assert _hours(walltime) == pytest.approx(hours)


def test_a_job_the_batch_system_cannot_take_fails_the_run_saying_why(tmp_path, small_volume):
    case = EngineCase("deconvolution", small_volume, "deconvolved", "sleepy_model:SleepyModel")
    config = case.pipeline(tmp_path / "out.zarr", tasks=4, iterations=10, delay=0.0)
    config["cluster"] = {**config["cluster"], "pbs": {"jobs": 2, "interface": "lo", "log_directory": str(tmp_path / "logs")}}
    done = rqml("run", str(write_yaml(tmp_path / "p.yaml", config)), "--no-progress", "--cluster", "pbs")  # no qsub here
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"^Error: task \S+ failed: could not submit a job for the run's nodes: FileNotFoundError: .*'qsub'", done.stderr, re.M), done.stderr
