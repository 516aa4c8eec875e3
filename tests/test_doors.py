"""Roles on every door of a pqtls:// scheduler: Dask's own handlers and streams behind the
roles of the peer's certificate, connections of a certificate revoked while connected cut
off, refused handshakes alerted, RQML handlers rate-limited per peer.

Real processes: a ``dask scheduler --protocol pqtls --preload rqml_dask.scheduler`` (admin:
the client certificate ``root``), one node, and clients in this process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import pytest
from distributed import Client, WorkerPlugin
from distributed.core import rpc
from distributed.protocol.pickle import dumps

from rqml_dask import events
from rqml_dask.trust import ca
from dask_processes import DaskProcess, node_worker
from etcd_server import free_port
from test_trust import trust_config, trust_env
from timing import bound, wait_for

HEARTBEAT = 1.0
"""The scheduler plugin's heartbeat here (``rqml.scheduler.heartbeat-interval``), in seconds."""
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def authority(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    ca.init(directory)
    for name, role in (("scheduler", "scheduler"), ("node-a", "node"), ("alice", "client"), ("root", "client")):
        ca.issue(directory, name, role)
    return directory


@pytest.fixture(scope="module")
def cluster(authority, tmp_path_factory):
    """``(address, scheduler process, its log)``: the scheduler, with ``root`` as its admin, and
    node-a under a nanny with the node preload (its doors)."""
    logs = tmp_path_factory.mktemp("doors-logs")
    port = free_port()
    address = f"pqtls://127.0.0.1:{port}"
    settings = {"DASK_RQML__TRUST__ADMIN_NAMES": '["root"]', "DASK_RQML__SCHEDULER__HEARTBEAT_INTERVAL": f"{HEARTBEAT}s"}
    scheduler = DaskProcess(["scheduler", "--protocol", "pqtls", "--host", "127.0.0.1", "--port", str(port),
                             "--dashboard-address", "127.0.0.1:0", "--preload", "rqml_dask.scheduler"],
                            logs / "scheduler.log", {**trust_env(authority, "scheduler"), **settings}).start()
    node = node_worker(address, "node-a", logs / "node-a.log", trust_env(authority, "node-a"), nanny=("rqml_dask.node",)).start()
    try:
        with as_peer(authority, "root", address) as root:
            root.wait_for_workers(1, timeout=bound(60))
        yield address, scheduler.process, logs / "scheduler.log"
    finally:
        node.kill()
        scheduler.kill()


@contextlib.contextmanager
def as_peer(authority: Path, name: str, address: str) -> Iterator[Client]:
    """A client presenting the certificate ``name`` (Dask's config is the process's: one
    certificate at a time, so these tests hold one client at a time)."""
    with dask.config.set(trust_config(authority, name)), Client(address, timeout=bound(60)) as client:
        yield client


def call(authority: Path, certificate: str, address: str, op: str, **message):
    """One call of the scheduler handler ``op`` with the certificate named ``certificate``, without a client session."""

    async def once():
        async with rpc(address) as scheduler:
            return await getattr(scheduler, op)(**message)

    with dask.config.set(trust_config(authority, certificate)):
        return asyncio.run(once())


def alerts(client: Client, kind: str) -> list[dict]:
    return [e for _, e in client.get_events(events.ALERTS) if e.get("kind") == kind]


class Marker(WorkerPlugin):
    """A worker plugin that is not a pipeline's."""

    def setup(self, worker):
        worker.marked = True


@pytest.mark.slow
def test_a_node_certificate_cannot_open_a_client_session_nor_run_code(authority, cluster):
    address, _, _ = cluster
    with dask.config.set(trust_config(authority, "node-a")), \
            pytest.raises(Exception, match="node-a has role node: only a client certificate opens a client session"):
        Client(address, timeout=bound(60)).close()
    with pytest.raises(PermissionError, match="run_function: the certificate of node-a has role node, which may not call it"):
        call(authority, "node-a", address, "run_function", function=b"")
    with pytest.raises(PermissionError, match="broadcast: the certificate of node-a has role node"):
        call(authority, "node-a", address, "broadcast", msg={"op": "run", "function": b""})
    with pytest.raises(PermissionError, match="register_scheduler_plugin: the certificate of node-a has role node"):
        call(authority, "node-a", address, "register_scheduler_plugin", plugin=b"", name="x", idempotent=False)
    # a node may speak for its own worker only
    with pytest.raises(PermissionError, match="node node-a may call it about its own worker only"):
        call(authority, "node-a", address, "retire_workers", names=["node-a"])
    assert call(authority, "node-a", address, "identity")["type"] == "Scheduler"


@pytest.mark.slow
def test_only_an_admin_certificate_runs_code_on_the_scheduler_and_the_workers(authority, cluster, tmp_path):
    from rqml_dask.pipeline.plugins import ship_plugins

    address, scheduler, _ = cluster
    with as_peer(authority, "alice", address) as alice:
        assert alice.submit(lambda x: x + 1, 1).result(timeout=bound(60)) == 2  # a client's work goes on
        with pytest.raises(PermissionError, match="run_function: the certificate of alice has role client.*rqml.trust.admin-names"):
            alice.run_on_scheduler(os.getpid)
        with pytest.raises(PermissionError, match="broadcast: the certificate of alice has role client"):
            alice.run(os.getpid)
        with pytest.raises(PermissionError, match="registers only a pipeline's plugins"):
            alice.register_plugin(Marker(), name="marker")
        with pytest.raises(PermissionError, match="restart: the certificate of alice"):
            alice.restart()
        [(worker, info)] = alice.scheduler_info()["workers"].items()  # nor straight at a worker: there only the scheduler may
        with pytest.raises(PermissionError, match="run: the certificate of alice has role client; only the scheduler may call it"):
            alice.sync(alice.rpc(worker).run, function=dumps(os.getpid))
        with pytest.raises(PermissionError, match="plugin-add: the certificate of alice has role client"):
            alice.sync(getattr(alice.rpc(worker), "plugin-add"), plugin=dumps(Marker()), name="marker")
        for handler in ("benchmark_disk", "profile", "get_logs", "rqml_progress"):  # an allow-list: minutes of disk, logs
            with pytest.raises(PermissionError, match=f"{handler}: the certificate of alice has role client"):
                alice.sync(getattr(alice.rpc(worker), handler))
        # nor at its nanny, which would run the code in the node's own process group
        for handler, message in (("run", {"function": dumps(os.getpid)}), ("plugin_add", {"plugin": dumps(Marker()), "name": "m"}),
                                 ("restart", {}), ("kill", {})):
            with pytest.raises(PermissionError, match=f"nanny {handler}: the certificate of alice has role client; only the scheduler"):
                alice.sync(getattr(alice.rpc(info["nanny"]), handler), **message)
        direct = alice.submit(lambda: 5, pure=False)  # what a client needs of a worker directly: its data
        assert alice.gather(direct, direct=True) == 5
        with pytest.raises(PermissionError, match="only the scheduler and its nodes' streams write the rqml event topics"):
            alice.log_event(events.ALERTS, {"kind": "node-quarantined", "node_name": "node-a"})
        plugin = tmp_path / "door_models.py"
        plugin.write_text("SHIPPED = 7\n")
        ship_plugins(alice, [plugin])  # what `rqml run` ships: a pipeline's model files
        assert alice.submit(lambda: __import__("door_models").SHIPPED, pure=False).result(timeout=bound(60)) == 7
        assert alice.sync(alice.scheduler.rqml_status)["nodes"]
    with as_peer(authority, "root", address) as root:
        assert root.run_on_scheduler(os.getpid) == scheduler.pid
        [pid] = root.run(os.getpid).values()
        assert pid not in (os.getpid(), scheduler.pid)
        [nanny_pid] = root.run(os.getpid, nanny=True).values()  # through the scheduler, an admin reaches the nanny
        assert nanny_pid not in (os.getpid(), scheduler.pid, pid)
        assert not [e for _, e in root.get_events(events.ALERTS) if e.get("node_name") == "node-a"]  # nothing forged got in


@pytest.mark.slow
def test_a_node_whose_nanny_has_open_doors_does_not_start(authority, cluster, tmp_path):
    """A nanny started without the node preload answers any certificate of the CA (``run``:
    code in the node's processes), so its worker refuses to start and the node stops, saying
    how to launch it."""
    address, _, _ = cluster
    ca.issue(authority, "node-open", "node")
    log = tmp_path / "node-open.log"
    with node_worker(address, "node-open", log, trust_env(authority, "node-open"), nanny=()) as node:
        wait_for(lambda: node.process.poll() is not None, timeout=60, what="the node (its nanny too) to stop")
        with as_peer(authority, "root", address) as root:
            assert "node-open" not in {w["name"] for w in root.scheduler_info()["workers"].values()}
    assert "runs without the node's doors, so any certificate of the CA could run code in it" in log.read_text()


@pytest.mark.slow
def test_a_client_whose_certificate_is_revoked_is_cut_off_within_a_heartbeat(authority, cluster):
    address, _, _ = cluster
    ca.issue(authority, "carol", "client")
    with as_peer(authority, "carol", address) as carol:
        assert carol.submit(lambda: 3).result(timeout=bound(60)) == 3
        revoked = time.time()
        ca.revoke(authority, "carol")
        wait_for(lambda: carol.status != "running", timeout=10, interval=0.05, what="carol's session ended")
        with pytest.raises(OSError):  # every connection of hers went, and no new one opens
            carol.sync(carol.scheduler.rqml_status, callback_timeout=bound(20))
        carol_id = carol.id
    with dask.config.set(trust_config(authority, "carol")), pytest.raises(OSError, match="certificate"):
        Client(address, timeout=bound(10))
    with as_peer(authority, "root", address) as root:
        [cut] = wait_for(lambda: alerts(root, "connection-cut"), timeout=10, what="the alert")
        assert (cut["peer"], cut["role"], cut["reason"], cut["security"]) == ("carol", "client", "its certificate was revoked", True)
        assert cut["time"] - revoked < HEARTBEAT + 0.5, f"cut off {cut['time'] - revoked:.1f} s after the revocation"
        assert carol_id not in root.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.clients))
        refused = wait_for(lambda: [a for a in alerts(root, "handshake-refused") if a["name"] == "carol"], timeout=20,
                           what="carol's attempt to connect again refused")
        assert refused[0]["reason"] == "its certificate: it was revoked"
        assert root.submit(lambda: 4).result(timeout=bound(60)) == 4  # nobody else was touched


@pytest.mark.slow
def test_refused_handshakes_raise_one_alert_per_peer_a_minute(authority, cluster, tmp_path):
    address, _, log = cluster
    ca.issue(authority, "late", "client", hours=-0.05)
    foreign = tmp_path / "foreign"
    ca.init(foreign)
    ca.issue(foreign, "alice", "client")
    for _ in range(3):
        for directory, name in ((authority, "late"), (foreign, "alice")):
            with dask.config.set(trust_config(directory, name)), pytest.raises(OSError):
                Client(address, timeout=bound(10))
    with as_peer(authority, "root", address) as root:
        refused = wait_for(lambda: (a := alerts(root, "handshake-refused")) and len({x["peer"] for x in a}) >= 2 and a,
                           timeout=20, what="alerts of both refusals")
    late = [a for a in refused if a["name"] == "late"]
    assert [(a["peer"], a["reason"], a["security"]) for a in late] == [("late (127.0.0.1)", "its certificate: it has expired", True)]
    # the foreign one refused the scheduler's certificate first: it is named by its address
    assert [a["peer"] for a in refused if a["name"] is None] == ["127.0.0.1"]
    assert len(re.findall(r"handshake-refused: late ", log.read_text())) == 1  # one line, not one per attempt


def sockets_and_rss(pid: int) -> tuple[int, int]:
    fds = Path(f"/proc/{pid}/fd")
    sockets = sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))
    rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return sockets, rss


@pytest.mark.slow
def test_a_flood_of_policy_calls_is_rate_limited_and_leaves_no_sockets_or_memory_behind(authority, cluster):
    address, scheduler, log = cluster
    before = sockets_and_rss(scheduler.pid)
    log_before = log.read_text()
    with as_peer(authority, "alice", address) as alice:

        async def flood(n: int = 3000) -> list:
            return await asyncio.gather(*(alice.scheduler.rqml_policy(policy={"max_inbound": 2}) for _ in range(n)),
                                        return_exceptions=True)

        started = time.monotonic()
        answers = alice.sync(flood)
        took = time.monotonic() - started
        limited = [a for a in answers if isinstance(a, PermissionError) and "more often than" in str(a)]
        through = len(answers) - len(limited)
        assert through <= 10 + took + 1, f"{through} calls went through in {took:.1f} s"
        # a call over the rate loses its connection: the scheduler holds about one a call that went through
        held = wait_for(lambda: (n := sockets_and_rss(scheduler.pid)[0]) <= before[0] + through + 4 and n, timeout=30,
                        interval=0.5, what="the refused calls' connections closed")
    deadline = time.monotonic() + bound(30)
    while (after := sockets_and_rss(scheduler.pid))[0] > before[0] + 1 or after[1] > before[1] + (32 << 20):
        assert time.monotonic() < deadline, f"30 s after the flood the scheduler holds {after} (sockets, RSS), before {before}"
        time.sleep(0.5)
    lines = log.read_text()[len(log_before):]
    assert "Traceback" not in lines
    refused_lines = re.findall(r"refused rqml_policy to alice: .*", lines)
    assert 1 <= len(refused_lines) <= took / 10 + 2, refused_lines[:5]
    print(f"flood: {len(answers)} calls in {took:.1f} s, {len(limited)} refused; sockets/RSS before {before}, "
          f"with the client {held}, after {after}")


@pytest.mark.slow
def test_rqml_run_with_a_client_certificate_that_is_not_an_admin_ships_its_plugins_and_completes(authority, cluster, tmp_path, small_volume):
    import subprocess
    import sys

    import zarr

    from conftest import pipeline_dict, write_yaml

    address, _, _ = cluster
    config = pipeline_dict(small_volume, tmp_path / "out.zarr", plugins=[str(TESTS / "sleepy_model.py")])
    done = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "run", str(write_yaml(tmp_path / "p.yaml", config)),
                           "--scheduler", address, "--no-progress"], env={**os.environ, **trust_env(authority, "alice")},
                          capture_output=True, text=True, timeout=bound(300), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "complete"
    assert "PermissionError" not in done.stderr


def test_a_node_stream_carries_no_client_message_and_a_client_stream_speaks_for_itself():
    """What a session's stream may carry, on a stand-in comm (no processes)."""
    from rqml_dask.scheduler.doors import CLIENT_STREAM, WORKER_STREAM, FilteredStream
    from rqml_dask.scheduler.gatekeeper import Gatekeeper

    class Batches:
        peer_name, peer_address = "node-a", "pqtls://127.0.0.1:1"

        def __init__(self, batch):
            self.batch = batch

        async def read(self, deserializers=None):
            return self.batch

    class Scheduler:
        logged: list = []

        def log_event(self, topic, message):
            self.logged.append((topic, message))

    scheduler = Scheduler()
    node = FilteredStream(Batches([{"op": "task-finished", "key": "k"}, {"op": "update-graph", "client": "c-1"},
                                   {"op": "task-finished", "key": "x", "worker": "pqtls://127.0.0.1:2"}]),
                          WORKER_STREAM, "worker", None, scheduler, Gatekeeper(admins=frozenset()))
    assert asyncio.run(node.read()) == [{"op": "task-finished", "key": "k"}]
    [(topic, alert)] = scheduler.logged
    assert topic == events.ALERTS and alert["kind"] == "stream-message-refused" and alert["peer"] == "node-a"
    assert "a worker session may not send task-finished, update-graph: dropped" == alert["reason"]
    client = FilteredStream(Batches([{"op": "client-desires-keys", "client": "c-1", "keys": []},
                                     {"op": "client-releases-keys", "client": "c-2", "keys": ["k"]},
                                     {"op": "task-finished", "key": "k"}]),
                            CLIENT_STREAM, "client", "c-1", scheduler, Gatekeeper(admins=frozenset()))
    assert asyncio.run(client.read()) == [{"op": "client-desires-keys", "client": "c-1", "keys": []}]
    assert node.peer_address == "pqtls://127.0.0.1:1"  # everything else is the comm's
