"""A new user's foreseeable mistakes, through the real ``rqml`` command: each is answered with
one line on stderr (what, where, the fix) and exit status 1, soon, and ``--debug`` shows the
traceback. And what makes the first runs smooth: one live run per output, ``--secure`` runs
that reuse each other's results, quiet logs."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from conftest import TESTS, paced_pipeline_dict, pipeline_dict, write_yaml
from dask_processes import DaskProcess, dask_scheduler
from etcd_server import free_port
from test_trust import trust_env
from timing import bound, wait_for

QUICK = bound(15)
"""How soon a foreseeable error must be answered here (5 s on an idle machine; this one is shared)."""


def rqml(*args: str, env: dict[str, str] | None = None, cwd=None) -> tuple[subprocess.CompletedProcess, float]:
    """``rqml ARGS`` as a user runs it, and the seconds it took."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rqml_dask.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}, cwd=cwd, timeout=bound(240))
    return done, time.monotonic() - started


def one_line(done: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints on stderr, checked to be the only one, with exit status 1."""
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


@pytest.fixture
def pipeline_file(tmp_path, small_volume) -> Path:
    return write_yaml(tmp_path / "p.yaml", pipeline_dict(small_volume, tmp_path / "out.zarr"))


@pytest.mark.parametrize("command", [
    ["status"], ["events"], ["quarantine", "list"], ["models"], ["run", "{pipeline}"],
])
def test_an_unreachable_scheduler_is_one_line_naming_the_address_within_seconds(command, pipeline_file):
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    args = [a.format(pipeline=pipeline_file) for a in command]
    done, seconds = rqml(*args, "--scheduler", address, "--connect-timeout", "2")
    line = one_line(done)
    assert f"no scheduler answered at {address} within 2 s" in line and "--connect-timeout" in line
    assert seconds < QUICK
    assert not (pipeline_file.parent / "out.zarr").exists()  # nothing read or written first


def test_debug_shows_the_traceback(pipeline_file):
    done, _ = rqml("status", "--scheduler", f"tcp://127.0.0.1:{free_port()}", "--connect-timeout", "1", "--debug")
    assert done.returncode == 1 and "Traceback" in done.stderr and "SchedulerUnreachable" in done.stderr


@pytest.mark.parametrize("where", ["environment", "yaml"])
def test_a_bad_setting_is_one_line_with_its_key_value_origin_and_range_before_any_cluster_starts(where, pipeline_file, tmp_path):
    if where == "environment":
        env, origin = {"DASK_RQML__SCHEDULER__QUEUED_PER_NODE": "abc"}, "$DASK_RQML__SCHEDULER__QUEUED_PER_NODE"
    else:
        (tmp_path / "dask").mkdir()
        (tmp_path / "dask" / "mine.yaml").write_text("rqml:\n  scheduler:\n    queued-per-node: abc\n")
        env, origin = {"DASK_CONFIG": str(tmp_path / "dask")}, str(tmp_path / "dask" / "mine.yaml")
    done, seconds = rqml("run", str(pipeline_file), "--no-progress", env=env)
    line = one_line(done)
    assert line == (f"Error: Dask config rqml.scheduler.queued-per-node: Input should be a valid integer, unable to parse "
                    f"string as an integer (got 'abc', from {origin}; allowed: an integer >= 0)")
    assert seconds < QUICK
    assert not (tmp_path / "out.zarr").exists()


def test_an_unsafe_output_name_is_refused_before_anything_is_created(tmp_path, small_volume):
    config = pipeline_dict(small_volume, tmp_path / "out.zarr")
    config["output"]["array"] = "../x"
    done, _ = rqml("run", str(write_yaml(tmp_path / "p.yaml", config)), "--no-progress")
    assert done.returncode == 1 and "output.array: name '../x' holds '/'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]  # no output, no lock


def test_certificate_problems_on_a_pqtls_cluster_are_one_line_naming_the_file_and_the_fix(tmp_path):
    from rqml_dask.trust import ca

    authority, other = tmp_path / "ca", tmp_path / "other"
    ca.init(authority)
    ca.init(other)
    for name, role in (("scheduler", "scheduler"), ("alice", "client"), ("bob", "client")):
        ca.issue(authority, name, role)
    ca.issue(authority, "brief", "client", hours=1e-4)  # expired within a second
    ca.issue(other, "mallory", "client")
    ca.revoke(authority, "bob")
    port = free_port()
    address = f"pqtls://127.0.0.1:{port}"
    args = ["scheduler", "--protocol", "pqtls", "--host", "127.0.0.1", "--port", str(port),
            "--dashboard-address", "127.0.0.1:0", "--preload", "rqml_dask.scheduler"]
    with DaskProcess(args, tmp_path / "scheduler.log", trust_env(authority, "scheduler")):
        wait_for(lambda: rqml("status", "--scheduler", address, env=trust_env(authority, "alice"))[0].returncode == 0,
                 timeout=60, what="the pqtls scheduler answering alice")
        cases = {
            "revoked": (trust_env(authority, "bob"), "bob.pem (rqml.trust.cert, bob): it was revoked"),
            "expired": (trust_env(authority, "brief"), "brief.pem (rqml.trust.cert, brief): it has expired"),
            "foreign": ({**trust_env(other, "mallory"), "DASK_RQML__TRUST__CA": str(authority / "ca.pem")}, "mallory.pem (rqml.trust.cert, mallory): it is not of the cluster's CA"),
        }
        for case, (env, said) in cases.items():
            done, seconds = rqml("status", "--scheduler", address, env=env)
            line = one_line(done)
            assert said in line and "rqml ca issue CA_DIR" in line, (case, line)
            assert seconds < QUICK, case
        # this host trusts another CA: the scheduler's certificate is refused, and the CA file named
        done, _ = rqml("status", "--scheduler", address, env={**trust_env(authority, "alice"), "DASK_RQML__TRUST__CA": str(other / "ca.pem")})
        assert f"this host's CA certificate {other / 'ca.pem'} (rqml.trust.ca) does not accept" in one_line(done)
        done, _ = rqml("status", "--scheduler", address, env={**trust_env(authority, "alice"), "DASK_RQML__TRUST__CERT": str(tmp_path / "none.pem")})
        assert f"rqml.trust.cert: {tmp_path / 'none.pem'} is not a file" in one_line(done)


@pytest.mark.slow
def test_a_second_run_of_an_output_being_written_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, small_volume):
    slow = paced_pipeline_dict(small_volume, tmp_path / "out.zarr", iterations=2000)
    config = write_yaml(tmp_path / "p.yaml", slow)
    lock = tmp_path / "out.zarr.lock"
    first = subprocess.Popen([sys.executable, "-m", "rqml_dask.cli", "run", str(config), "--no-progress"],
                             env={**os.environ, "PYTHONPATH": str(TESTS)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "out.zarr").exists() and lock.exists(), timeout=120, what="the first run writing")
        done, seconds = rqml("run", str(config), "--no-progress")
        line = one_line(done)
        assert re.fullmatch(rf"Error: {re.escape(str(tmp_path / 'out.zarr'))} is being written by another rqml run "
                            rf"\(pid {first.pid} on \S+, since [\d :-]+; its lock: {re.escape(str(lock))}\): wait for it to end, "
                            r"or give this pipeline another output.store", line), line
        assert seconds < QUICK
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dies holding the lock: its file stays
        first.wait(bound(30))
    assert lock.exists()
    quick = write_yaml(tmp_path / "p.yaml", {**slow, "convergence": {**slow["convergence"], "max_iterations": 20}})
    done, _ = rqml("run", str(quick), "--no-progress", "--overwrite")  # of a shorter budget: another configuration
    assert done.returncode == 0, done.stderr
    assert not lock.exists()
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "complete"


@pytest.mark.slow
def test_secure_runs_keep_one_ca_per_user_and_the_second_reuses_every_result_quietly(tmp_path):
    """``rqml run pipelines/quickstart.yaml --secure`` twice, as a user runs it: the CA is kept
    under the user's config directory (0700), the second run reuses all 8 results, and no
    Dask INFO log is printed (``-v`` shows them)."""
    config_home = tmp_path / "config"
    env = {"XDG_CONFIG_HOME": str(config_home)}
    quickstart = str(TESTS.parent / "pipelines" / "quickstart.yaml")
    first, _ = rqml("run", quickstart, "--secure", "--no-progress", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE((config_home / "rqml").stat().st_mode) == 0o700
    assert stat.S_IMODE((config_home / "rqml" / "secure-ca").stat().st_mode) == 0o700
    second, _ = rqml("run", quickstart, "--secure", "--no-progress", env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert re.search(r"^recovered .* 8 reused from an earlier run$", second.stdout, re.M), second.stdout
    for done in (first, second):
        assert " - INFO - " not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) <= 6, done.stderr  # halo, transform, cluster, secure, dashboard, rqml pages
    verbose, _ = rqml("run", quickstart, "--secure", "--no-progress", "-v", env=env, cwd=tmp_path)
    assert verbose.returncode == 0 and "distributed.scheduler - INFO - " in verbose.stderr, verbose.stderr


def test_rqml_events_follows_a_topic_by_the_name_its_help_prints(tmp_path):
    from distributed import Client

    from rqml_dask import events

    def followed(dask_scheduler, client_id: str) -> bool:
        topic = dask_scheduler._broker._topics.get(events.ALERTS)  # what Broker.publish sends to (distributed/broker.py)
        return bool(topic and topic.subscribers - {client_id})

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    with dask_scheduler(port, tmp_path / "scheduler.log"):
        follow = subprocess.Popen([sys.executable, "-m", "rqml_dask.cli", "events", "--scheduler", address, "--topic", "alerts",
                                   "--connect-timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            with Client(address, timeout=bound(60)) as client:
                wait_for(lambda: client.run_on_scheduler(followed, client_id=client.id), what="rqml events following alerts")
                client.log_event(events.ALERTS, {"kind": "a-test-alert"})
                client.log_event(events.METRICS, {"kind": "not-followed"})
            line = follow.stdout.readline()
        finally:
            follow.terminate()
            follow.wait(bound(30))
    assert '"topic": "rqml-alerts"' in line and "a-test-alert" in line, line
    assert "not-followed" not in follow.stdout.read()
    unknown, _ = rqml("events", "--scheduler", address, "--topic", "nope")
    assert unknown.returncode == 1 and unknown.stderr.startswith(
        "Error: --topic: 'nope' is not one of 'task_inbound', 'task_results', 'metrics', 'heartbeats', 'alerts'")
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_help_shows_types_as_users_write_them_and_models_has_headers():
    synth, _ = rqml("data", "synth", "--help")
    assert "--shape Z,Y,X" in synth.stdout and "--grid [Z,]Y,X" in synth.stdout and "_INTS" not in synth.stdout
    assert "_FLOATS" not in rqml("data", "import", "--help")[0].stdout
    models, _ = rqml("models")
    assert models.stdout.splitlines()[:2] == ["this host", f"  {'model':40s} {'task class':15s} family"]
