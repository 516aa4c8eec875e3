"""Safe by default (issue 31, part 6) and names that cannot leave their place (part 7).

Nothing here listens beyond 127.0.0.0/8: a refusal is checked on a ``dask scheduler`` that
must exit before it listens, or on the exposure guard with a stand-in scheduler; moving an
HTTP server to loopback is checked from 127.0.0.2 (loopback too) with 127.0.0.1 as the only
address taken for loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import dask
import numpy as np
import pytest
import zarr

from rqml_dask import exposure
from rqml_dask.checkpoint import ArtifactRef, CheckpointError
from rqml_dask.config import ExposureSettings
from rqml_dask.exposure import ExposureError, check_listeners, exposed, insecure_warning, is_loopback
from rqml_dask.models import UnknownModelError, load_model
from rqml_dask.names import UnsafeName, check_task_id
from rqml_dask.pipeline.config import PipelineConfigError, load_pipeline_config
from rqml_dask.scheduler.exposure_guard import ExposureGuard
from rqml_dask.stores.artifacts import ArtifactStore
from rqml_dask.task import ArrayRef, Region, RQMLTask, TaskInput

from conftest import pipeline_dict, write_yaml
from timing import bound, wait_for

TESTS = Path(__file__).parent
SAFE = ExposureSettings(allow_insecure=False, expose_http=False)
INSECURE = ExposureSettings(allow_insecure=True, expose_http=False)


def _environ() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)}


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- part 6: where a scheduler may listen ------------------------------------------------------


def test_loopback_is_127_0_0_0_slash_8_and_1_and_nothing_that_reaches_other_hosts():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("", "0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "no-such-host.invalid"))
    assert exposed(["tcp://127.0.0.2:8786", "pqtls://:8786", "pqtls://10.0.0.5:8786", "inproc://x/1/2"]) == []
    assert exposed(["tcp://10.0.0.5:8786", "tcp://0.0.0.0:8786", ""]) == [
        "tcp://10.0.0.5:8786", "tcp://0.0.0.0:8786 (every interface)", "tcp:// (every interface)"]


def test_a_listener_beyond_loopback_without_pqtls_is_refused_unless_allowed_and_then_said_loudly():
    with pytest.raises(ExposureError, match=r"refusing to listen on tcp://0\.0\.0\.0:8786 \(every interface\) without pqtls://.*"
                                             r"rqml\.trust\.allow-insecure: true"):
        check_listeners(["tcp://0.0.0.0:8786"], SAFE)
    assert check_listeners(["tcp://127.0.0.1:8786", "pqtls://0.0.0.0:8786"], SAFE) == []
    assert check_listeners(["tcp://10.0.0.5:8786"], INSECURE) == ["tcp://10.0.0.5:8786"]
    assert insecure_warning(["tcp://10.0.0.5:8786"]).startswith("INSECURE: the RQML scheduler listens on tcp://10.0.0.5:8786")


def _stand_in(*addresses: str) -> SimpleNamespace:
    """What the guard reads of a scheduler: its listeners' addresses (nothing bound)."""
    return SimpleNamespace(listeners=[SimpleNamespace(listen_address=a) for a in addresses], http_server=None)


def test_the_guard_fails_the_start_of_a_scheduler_built_in_python_and_logs_an_allowed_one_loudly(caplog):
    with pytest.raises(ExposureError, match="refusing to listen on tcp://0.0.0.0:8786"):
        asyncio.run(ExposureGuard().start(_stand_in("tcp://0.0.0.0:8786")))
    guard = ExposureGuard()
    with dask.config.set({"rqml.trust.allow-insecure": True}), caplog.at_level(logging.WARNING):
        asyncio.run(guard.start(_stand_in("tcp://0.0.0.0:8786")))
    assert guard.insecure == ["tcp://0.0.0.0:8786 (every interface)"]
    assert [r.levelno for r in caplog.records if "INSECURE" in r.getMessage()] == [logging.WARNING]
    secure = ExposureGuard()
    asyncio.run(secure.start(_stand_in("pqtls://0.0.0.0:8786")))
    assert secure.insecure == []


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--port", "0"], ["--host", "tcp://0.0.0.0:0"]],
                         ids=["--host 0.0.0.0", "no --host (every interface)", "tcp:// address"])
def test_dask_scheduler_with_the_preload_refuses_to_listen_beyond_loopback_before_it_listens(args):
    """The refusal comes while the preload is imported, in the Scheduler's constructor:
    nothing is bound (no "Scheduler at" line, no dashboard), and the process exits 1."""
    done = subprocess.run([sys.executable, "-m", "dask", "scheduler", *args, "--dashboard-address", "127.0.0.1:0",
                           "--preload", "rqml_dask.scheduler"], capture_output=True, text=True, timeout=bound(60), env=_environ())
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("rqml scheduler: refusing to listen on tcp://") and "without pqtls://" in lines[-1], done.stderr
    assert "Scheduler at" not in done.stderr and "dashboard at" not in done.stderr and "Traceback" not in done.stderr


def test_dask_scheduler_with_the_preload_starts_on_a_loopback_address_without_any_setting(tmp_path):
    from distributed import Client

    port = _free_port("127.0.0.2")
    process = subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.2", "--port", str(port),
                                "--dashboard-address", "127.0.0.2:0", "--preload", "rqml_dask.scheduler"],
                               stdout=subprocess.DEVNULL, stderr=open(tmp_path / "scheduler.log", "w"), env=_environ())
    try:
        wait_for(lambda: "Scheduler at" in (tmp_path / "scheduler.log").read_text() or process.poll() is not None, timeout=60)
        assert process.poll() is None, (tmp_path / "scheduler.log").read_text()
        with Client(f"tcp://127.0.0.2:{port}", timeout=bound(30)) as client:
            assert client.sync(client.scheduler.rqml_status)["nodes"] == {}
        assert "INSECURE" not in (tmp_path / "scheduler.log").read_text()
    finally:
        process.kill()
        process.wait(bound(30))


NETNS_NODE = """
ip link set lo up
{python} -m dask scheduler --host 127.0.0.1 --port {port} --dashboard-address 127.0.0.1:0 --preload rqml_dask.scheduler \
    > scheduler.log 2>&1 &
scheduler=$!
trap 'kill -9 $scheduler' EXIT
for allow in false true; do
    DASK_RQML__TRUST__ALLOW_INSECURE=$allow timeout 40 {python} -m dask worker tcp://127.0.0.1:{port} --no-nanny \
        --preload rqml_dask.node --name open --host 0.0.0.0 --dashboard-address 127.0.0.1:0 > worker-$allow.log 2>&1
    echo "$allow exit $?"
done
"""


@pytest.mark.slow
def test_a_node_refuses_to_listen_beyond_loopback_without_pqtls_unless_allowed(tmp_path):
    """A real ``dask worker --host 0.0.0.0 --preload rqml_dask.node`` over tcp, in a network
    namespace of its own (nothing beyond loopback is reachable here): it stops before it
    registers, saying why and the ways out; with ``rqml.trust.allow-insecure`` it runs, and
    says so loudly."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here (unshare -n), where a listener beyond loopback is allowed")
    done = subprocess.run(["unshare", "-n", "sh", "-c", NETNS_NODE.format(python=sys.executable, port=8786)], cwd=tmp_path, env=_environ(),
                          capture_output=True, text=True, timeout=bound(150))
    refused, allowed = (tmp_path / "worker-false.log").read_text(), (tmp_path / "worker-true.log").read_text()
    assert "false exit 1" in done.stdout, (done.stdout, refused[-2000:])
    assert "rqml node: refusing to listen on tcp://0.0.0.0:" in refused and "(every interface) without pqtls://" in refused
    assert "runs code on this node" in refused and "Registered to" not in refused
    assert "true exit 124" in done.stdout, (done.stdout, allowed[-2000:])  # ran until the timeout ended it
    assert "INSECURE: the RQML node listens on tcp://0.0.0.0:" in allowed and "Registered to" in allowed


def test_dashboards_and_node_endpoints_are_moved_to_loopback_and_the_log_says_where(monkeypatch, caplog):
    """127.0.0.2 stands for an address beyond loopback here (only 127.0.0.1 counts as
    loopback): the scheduler's dashboard and a node's HTTP endpoints, bound there by Dask,
    end up on 127.0.0.1 at the same port, still serving, and the log says so."""
    from distributed import Scheduler, Worker

    monkeypatch.setattr(exposure, "is_loopback", lambda host: host.strip("[]") == "127.0.0.1")

    async def run() -> None:
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.2:0", preload=["rqml_dask.scheduler"]) as s:
            async with Worker(s.address, host="127.0.0.1", dashboard_address="127.0.0.2:0", preload=["rqml_dask.node"]) as w:
                for server in (s.http_server, w.http_server):
                    assert [sock.getsockname() for sock in server._sockets.values()] == [("127.0.0.1", server.port)]
                    body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health",
                                                                                  timeout=bound(10)).read())
                    assert body
                    with pytest.raises(OSError):
                        await asyncio.to_thread(socket.create_connection, ("127.0.0.2", server.port), 2)
                moved = [r.getMessage() for r in caplog.records if "listens on 127.0.0.1:" in r.getMessage()]
                assert any(f"the dashboard listens on 127.0.0.1:{s.http_server.port} only, not on 127.0.0.2:{s.http_server.port}"
                           in m for m in moved), moved
                assert any(f"HTTP server (/health, /metrics, ...) listens on 127.0.0.1:{w.http_server.port} only" in m
                           for m in moved), moved

    with caplog.at_level(logging.WARNING):
        asyncio.run(run())


def test_expose_http_leaves_dask_s_binding():
    from tornado.httpserver import HTTPServer
    from tornado.web import Application

    async def run() -> None:
        server = HTTPServer(Application())
        server.listen(0, "127.0.0.2")
        server.port = next(iter(server._sockets.values())).getsockname()[1]
        with pytest.MonkeyPatch.context() as m:
            m.setattr(exposure, "is_loopback", lambda host: host == "127.0.0.1")
            door = exposure.confine_http(server, ExposureSettings(allow_insecure=False, expose_http=True))
            assert door.listening == (f"127.0.0.2:{server.port}",) and not door.moved_from and door.level == logging.WARNING
            assert "plain HTTP beyond loopback" in door.describe("the dashboard")
        server.stop()

    asyncio.run(run())


@pytest.mark.slow
def test_the_embedded_rqml_run_works_without_any_setting(tmp_path, small_volume):
    config = write_yaml(tmp_path / "p.yaml", pipeline_dict(small_volume, tmp_path / "out.zarr", tiling={"tile": [24, 48, 48]},
                                                           models={"ladder": ["richardson_lucy"]}))
    env = {k: v for k, v in _environ().items() if not k.startswith("DASK_RQML__TRUST")}
    done = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "run", str(config), "--no-progress"],
                          capture_output=True, text=True, timeout=bound(240), env=env)
    assert done.returncode == 0, done.stderr
    assert "refusing" not in done.stderr and "INSECURE" not in done.stderr
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "complete"


# -- part 7: names -----------------------------------------------------------------------------


def test_an_output_array_that_leaves_the_store_is_refused_by_rqml_run_before_any_output_exists(tmp_path, small_volume):
    config = write_yaml(tmp_path / "p.yaml", pipeline_dict(small_volume, tmp_path / "out.zarr", output={
        "store": str(tmp_path / "out.zarr"), "array": "../x"}))
    done = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "run", str(config), "--no-progress"],
                          capture_output=True, text=True, timeout=bound(120), env=_environ())
    assert done.returncode == 1
    assert done.stderr.strip().endswith("output.array: name '../x' holds '/': it must be one name, not a path (got '../x')"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize(("where", "value", "complaint"), [
    ("name", "a/b", "name: name 'a/b' holds '/'"),
    ("name", "..", "name: name '..' has '..'"),
    ("name", ".", "name: name '.' has '.'"),
    ("output.array", "..", "output.array: name '..' has '..'"),
    ("input.image", "../observed", "input.image: array '../observed' has '..'"),
    ("input.truth", "/etc/passwd", "input.truth: array '/etc/passwd' has an empty part"),
])
def test_names_that_would_leave_their_place_are_refused_with_the_field(tmp_path, small_volume, where, value, complaint):
    data = pipeline_dict(small_volume, tmp_path / "out.zarr")
    section, _, key = where.rpartition(".")
    (data[section] if section else data)[key] = value
    with pytest.raises(PipelineConfigError) as refused:
        load_pipeline_config(write_yaml(tmp_path / "p.yaml", data))
    assert complaint in str(refused.value)
    assert not (tmp_path / "out.zarr").exists()


def _task(task_id: str) -> RQMLTask:
    ref = ArrayRef("in.zarr", "observed")
    return RQMLTask(task_id=task_id, task_class="deconvolution", region=Region(((0, 1),), ((0, 1),)),
                    input=TaskInput(ref, ref), output=ref, model_ladder=("richardson_lucy",))


def test_a_task_id_that_would_leave_the_artifacts_root_is_refused_however_the_task_is_made():
    good = _task("p/0001")
    assert check_task_id("quickstart/0007/vote-sleepy_model:SleepyModel@0123abcd")  # a voter's, with its key's digest
    with pytest.raises(UnsafeName, match=r"task id 'x/\.\./\.\./escape-dir/t0' has '\.\.'"):
        _task("x/../../escape-dir/t0")
    with pytest.raises(UnsafeName):
        dataclasses.replace(good, task_id="../t0")  # as a node does on loading the task's data
    with pytest.raises(ValueError, match="task id"):
        RQMLTask.from_dict({**good.to_dict(), "task_id": "a//b"})


def test_an_artifact_key_escaping_the_root_is_refused_before_any_write_or_delete(tmp_path):
    root, outside = tmp_path / "artifacts", tmp_path / "escape-dir"
    outside.mkdir()
    (outside / "precious").write_text("kept")
    store = ArtifactStore(root)
    arrays = {"estimate": np.ones(4, np.float32)}
    for key in ("x/../../escape-dir/t0@0123", "../escape-dir@0123", "/abs@0123"):
        with pytest.raises(UnsafeName):
            store.write(key, 1, "node-a", arrays)
        with pytest.raises(UnsafeName):
            store.delete_task(key)
    (root / "tasks").mkdir(parents=True)
    (root / "tasks" / "linked").symlink_to(outside, target_is_directory=True)  # a link planted in the root
    with pytest.raises(UnsafeName, match="outside its root"):
        store.write("linked/t0@0123", 1, "node-a", arrays)
    with pytest.raises(UnsafeName, match="outside its root"):
        store.delete_task("linked/t0@0123")
    with pytest.raises(CheckpointError, match="outside its root"):
        store.read(ArtifactRef("estimate", str(outside / "precious"), (4,), "float32", "0" * 64))
    assert sorted(p.name for p in outside.iterdir()) == ["precious"] and (outside / "precious").read_text() == "kept"
    refs = store.write("p/0001@0123", 1, "node-a", arrays)  # a good key still writes, under the root
    assert Path(refs[0].location).resolve().is_relative_to(root.resolve())
    assert np.array_equal(store.read(refs[0]), arrays["estimate"])


def test_a_model_name_resolves_only_among_entry_points_and_the_pipeline_s_plugin_files(tmp_path, small_volume, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "side_effect_models.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "from sleepy_model import SleepyModel as Model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("side_effect_models:Model", "os.path:join", "this:Anything"):
        with pytest.raises(UnknownModelError, match="is not one of the pipeline's plugin files"):
            load_model(name)
    assert not marker.exists() and "this" not in sys.modules
    data = pipeline_dict(small_volume, tmp_path / "out.zarr", models={"ladder": ["side_effect_models:Model"]})
    with pytest.raises(PipelineConfigError, match=r"models\.ladder: model 'side_effect_models:Model': 'side_effect_models' "
                                                  r"is not one of the pipeline's plugin files"):
        load_pipeline_config(write_yaml(tmp_path / "p.yaml", data))
    assert not marker.exists()
    data["plugins"] = [str(tmp_path / "side_effect_models.py")]  # listed under plugins: it is the pipeline's own
    assert load_pipeline_config(write_yaml(tmp_path / "p.yaml", data)).models.ladder == ["side_effect_models:Model"]
    assert marker.exists()
