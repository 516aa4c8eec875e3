"""Trust between nodes: the Central Authority, and the pqtls:// transport between real
Dask processes (ML-DSA-65 certificates, X25519MLKEM768, mutual TLS 1.3)."""

from __future__ import annotations

import datetime
import os
import re
import stat
import tempfile
import time
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from cryptography import x509
from distributed import Client

from rqml_dask.trust import ca
from etcd_server import free_port
from test_scheduler_plugin import run_or_explain
from timing import bound, wait_for

pytestmark = pytest.mark.slow

REFUSED = "alert|certificate|handshake"  # what OpenSSL says when the other side refuses a certificate
ADMIN = {"DASK_RQML__TRUST__ADMIN_NAMES": '["alice"]'}
"""alice may run code on these tests' schedulers (``Client.run`` to look at the nodes); mallory may not."""


@pytest.fixture(scope="module")
def authority(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    ca.init(directory)
    for name, role in (("scheduler", "scheduler"), ("node-a", "node"), ("alice", "client"), ("mallory", "client")):
        ca.issue(directory, name, role)
    return directory


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def trust_env(directory: Path, name: str) -> dict[str, str]:
    return {
        "DASK_RQML__TRUST__CA": str(directory / "ca.pem"),
        "DASK_RQML__TRUST__CERT": str(directory / "issued" / f"{name}.pem"),
        "DASK_RQML__TRUST__KEY": str(directory / "issued" / f"{name}-key.pem"),
    }


def trust_config(directory: Path, name: str) -> dict:
    return {"rqml.trust": {"ca": str(directory / "ca.pem"), "cert": str(directory / "issued" / f"{name}.pem"),
                           "key": str(directory / "issued" / f"{name}-key.pem")}}


def test_the_ca_issues_ml_dsa_credentials_with_private_keys_only_its_owner_reads(tmp_path):
    ca.init(tmp_path, passphrase="s3cret")
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600
    with pytest.raises(ca.CAError, match="already holds a CA"):
        ca.init(tmp_path)
    with pytest.raises(ca.CAError, match="passphrase"):
        ca.issue(tmp_path, "node-a", "node")  # the CA key is encrypted
    credential = ca.issue(tmp_path, "node-a", "node", hosts=("10.0.0.7", "gpu-a.example"), passphrase="s3cret")
    assert stat.S_IMODE(credential.key.stat().st_mode) == 0o600
    leaf, root = x509.load_pem_x509_certificates(credential.cert.read_bytes())
    root.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes)  # ML-DSA-65: no hash argument
    assert leaf.signature_algorithm_oid.dotted_string == "2.16.840.1.101.3.4.3.18"  # id-ml-dsa-65
    assert ca.role_of(leaf) == "node" and ca.name_of(leaf) == "node-a"
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert sans.get_values_for_type(x509.DNSName) == ["gpu-a.example"]
    with pytest.raises(ca.CAError, match="role 'admin'"):
        ca.issue(tmp_path, "eve", "admin", passphrase="s3cret")
    serial = ca.revoke(tmp_path, "node-a", passphrase="s3cret")
    crl = ca.load_crl(tmp_path / "crl.pem")
    assert [entry.serial_number for entry in crl] == [serial] and crl.is_signature_valid(root.public_key())


def start_pq_scheduler(authority: Path, logs: Path) -> tuple[str, subprocess.Popen]:
    """``dask scheduler --protocol pqtls --preload rqml_dask.scheduler`` with the CA's scheduler certificate."""
    port = free_port()
    env = {**os.environ, **trust_env(authority, "scheduler"), **ADMIN}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--protocol", "pqtls", "--host", "127.0.0.1",
         "--port", str(port), "--dashboard-address", "127.0.0.1:0", "--preload", "rqml_dask.scheduler"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(logs / "scheduler.log", "wb"),
    )
    return f"pqtls://127.0.0.1:{port}", scheduler


@pytest.fixture(scope="module")
def pq_scheduler(authority, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pq-logs")
    address, scheduler = start_pq_scheduler(authority, logs)
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--preload-nanny", "rqml_dask.node",
         "--name", "node-a", "--dashboard-address", "127.0.0.1:0", "--preload", "rqml_dask.node"],
        env={**os.environ, **trust_env(authority, "node-a")}, stdout=subprocess.DEVNULL, stderr=open(logs / "node-a.log", "wb"),
    )
    try:
        yield address, scheduler
    finally:
        for process in (worker, scheduler):
            process.terminate()
        for process in (worker, scheduler):
            try:
                process.wait(timeout=bound(30))
            except subprocess.TimeoutExpired:
                process.kill()


def test_a_client_with_a_certificate_of_the_ca_runs_work_on_a_node_over_post_quantum_tls(authority, pq_scheduler):
    address, _ = pq_scheduler
    with dask.config.set(trust_config(authority, "alice")), Client(address, timeout=bound(60)) as client:
        client.wait_for_workers(1, timeout=bound(60))
        assert client.submit(lambda x: x + 1, 41).result(timeout=bound(60)) == 42
        comm = client.scheduler_comm.comm
        assert comm.group == "X25519MLKEM768" and comm.peer_name == "scheduler" and comm.peer_role == "scheduler"
        assert comm.cipher.startswith("TLS_AES")


def test_a_peer_without_a_certificate_of_the_ca_never_connects(tmp_path, authority, pq_scheduler):
    address, _ = pq_scheduler
    other = tmp_path / "other-ca"
    ca.init(other)
    ca.issue(other, "alice", "client")  # the right name, from the wrong authority
    with dask.config.set(trust_config(other, "alice")), pytest.raises(OSError, match=REFUSED):
        Client(address, timeout=bound(20))


def test_an_expired_certificate_is_refused(tmp_path, authority, pq_scheduler):
    address, _ = pq_scheduler
    ca.issue(authority, "late", "client", hours=-0.05)
    with dask.config.set(trust_config(authority, "late")), pytest.raises(OSError, match=REFUSED):
        Client(address, timeout=bound(20))


def test_a_revoked_certificate_is_refused_without_restarting_the_scheduler(authority, pq_scheduler):
    address, _ = pq_scheduler
    with dask.config.set(trust_config(authority, "mallory")):
        with Client(address, timeout=bound(60)) as client:
            assert client.submit(lambda: 1).result(timeout=bound(60)) == 1
        ca.revoke(authority, "mallory")
        with pytest.raises(OSError, match=REFUSED):
            Client(address, timeout=bound(20))


def test_a_client_certificate_cannot_register_a_worker(authority, pq_scheduler):
    address, _ = pq_scheduler
    worker = subprocess.run(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-nanny",
         "--dashboard-address", "127.0.0.1:0", "--death-timeout", "20"],
        env={**os.environ, **trust_env(authority, "alice")}, capture_output=True, text=True, timeout=bound(60),
    )
    assert worker.returncode != 0
    assert "role client" in worker.stderr, worker.stderr[-3000:]


def test_pqtls_without_credentials_says_which_keys_are_missing():
    from rqml_dask.trust.transport import Credentials, TrustConfigError

    with dask.config.set({"rqml.trust": {"ca": None, "cert": None, "key": None}}), pytest.raises(TrustConfigError, match="rqml.trust.ca"):
        Credentials.from_config()


def test_a_secure_run_gives_the_same_output_as_over_tcp_and_shows_who_is_connected(tmp_path, authority, pq_scheduler, small_volume, client):
    import numpy as np
    import zarr

    from rqml_dask import Pipeline
    from rqml_dask.pipeline import load_pipeline_config

    from conftest import pipeline_dict, write_yaml

    address, _ = pq_scheduler
    outputs = {}
    for transport in ("tcp", "pqtls"):
        pipeline = Pipeline(load_pipeline_config(write_yaml(tmp_path / f"{transport}.yaml",
                                                            pipeline_dict(small_volume, tmp_path / f"{transport}.zarr"))))
        if transport == "tcp":
            report = pipeline.run(client, progress=False)  # the suite's embedded tcp:// cluster
        else:
            with dask.config.set(trust_config(authority, "alice")), Client(address, timeout=bound(60)) as secure:
                report = pipeline.run(secure, progress=False)
                state = secure.sync(secure.scheduler.rqml_status)
                [node] = [n for n in state["nodes"].values() if n["identity"]["name"] == "node-a"]
                health = secure.run(lambda dask_worker: dask_worker.plugins["rqml-node"].health())
        assert all(o.accepted for o in report.outcomes)
        outputs[transport] = zarr.open_group(tmp_path / f"{transport}.zarr", mode="r")["deconvolved"][...]
    np.testing.assert_array_equal(outputs["pqtls"], outputs["tcp"])
    assert {k: node["identity"][k] for k in ("name", "role", "group")} == {"name": "node-a", "role": "node", "group": "X25519MLKEM768"}
    assert node["identity"]["expires"] > time.time() and not node["identity"]["renewed"]  # a year-long certificate: not renewed yet
    [link] = health.values()
    assert link["scheduler_identity"] == {"name": "scheduler", "role": "scheduler", "group": "X25519MLKEM768"}


@pytest.mark.browser
def test_a_node_revoked_while_it_runs_is_quarantined_and_stays_out(authority, pq_scheduler, browser, tmp_path):
    from rqml_dask import events

    address, _ = pq_scheduler
    ca.issue(authority, "node-b", "node")
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--name", "node-b",
         "--dashboard-address", "127.0.0.1:0", "--no-nanny"],
        env={**os.environ, **trust_env(authority, "node-b")}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        with dask.config.set(trust_config(authority, "alice")), Client(address, timeout=bound(60)) as client:
            client.wait_for_workers(2, timeout=bound(60))
            ca.revoke(authority, "node-b")
            wait_for(lambda: "node-b" in client.sync(client.scheduler.rqml_status)["quarantined"], timeout=30,
                     what="node-b in quarantine")
            state = client.sync(client.scheduler.rqml_status)
            assert state["quarantined"]["node-b"] == "its certificate was revoked"
            wait_for(lambda: [w["name"] for w in client.scheduler_info()["workers"].values()] == ["node-a"], timeout=30,
                     what="node-b removed")
            alerts = [e for _, e in client.get_events(events.ALERTS) if e.get("kind") == "node-quarantined" and e["node_name"] == "node-b"]
            assert [(a["node_name"], a["reason"], a["security"]) for a in alerts] == [("node-b", "its certificate was revoked", True)]
            assert client.submit(lambda: 7).result(timeout=bound(60)) == 7  # node-a goes on
            # node-a was told: it refuses what node-b signed (a checkpoint it might resume from)
            told = wait_for(lambda: (q := client.run(lambda dask_worker: dict(dask_worker.plugins["rqml-node"].quarantined)))
                            and all(q.values()) and q, what="node-a told of the quarantine")
            assert list(told.values()) == [{"node-b": "its certificate was revoked"}]
            browser.get(client.dashboard_link.replace("/status", "/rqml"))
            read = "const doc = Bokeh.documents[0]; return [doc.get_model_by_name('rqml-nodes').data, doc.get_model_by_name('rqml-summary').text]"

            def page():
                try:
                    nodes, summary = browser.execute_script(read)
                except Exception:
                    return None  # still loading
                return (nodes, summary) if "quarantined" in summary else None

            nodes, summary = wait_for(page, timeout=30, what="/rqml showing the quarantine")
            browser.save_screenshot(str(tmp_path / "rqml-quarantine.png"))
            assert "quarantined: node-b (its certificate was revoked)" in summary
            assert nodes["name"] == ["node-a"] and nodes["certificate"] == ["node-a, X25519MLKEM768"]
        assert worker.wait(timeout=bound(60)) is not None  # node-b was closed, and cannot come back
        env = {**os.environ, **trust_env(authority, "alice")}
        listed = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "quarantine", "list", "--scheduler", address],
                                env=env, capture_output=True, text=True, timeout=bound(60))
        assert "node-b: its certificate was revoked" in listed.stdout, listed.stderr[-2000:]
        released = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "quarantine", "release", "node-b", "--scheduler", address],
                                  env=env, capture_output=True, text=True, timeout=bound(60))
        assert released.returncode == 0 and "released node-b" in released.stdout, released.stderr[-2000:]
        again = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "quarantine", "release", "node-b", "--scheduler", address],
                               env=env, capture_output=True, text=True, timeout=bound(60))
        assert again.returncode != 0 and "not in quarantine" in again.stderr
    finally:
        worker.kill()


def test_a_node_whose_certificate_names_another_node_cannot_register(authority, pq_scheduler):
    address, _ = pq_scheduler
    worker = subprocess.run(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-nanny", "--name", "impostor",
         "--dashboard-address", "127.0.0.1:0", "--death-timeout", "20"],
        env={**os.environ, **trust_env(authority, "node-a")}, capture_output=True, text=True, timeout=bound(60),
    )
    assert worker.returncode != 0
    assert "the certificate names node-a but the worker registers as --name impostor" in worker.stderr, worker.stderr[-3000:]


def test_a_plain_tcp_client_cannot_talk_to_a_pqtls_scheduler(pq_scheduler):
    address, _ = pq_scheduler
    with pytest.raises((OSError, TimeoutError)):
        Client(address.replace("pqtls://", "tcp://"), timeout=5)


def test_the_rqml_handlers_answer_only_the_roles_they_serve(authority, pq_scheduler):
    import asyncio

    from distributed.core import rpc

    address, _ = pq_scheduler

    async def set_policy_as_a_node():  # a node certificate opens no client session (tests/test_doors.py): a bare call
        async with rpc(address) as scheduler:
            return await scheduler.rqml_policy(policy={"max_inbound": 1})

    with dask.config.set(trust_config(authority, "node-a")):
        with pytest.raises(PermissionError, match="rqml_policy: the certificate of node-a has role node"):
            asyncio.run(set_policy_as_a_node())
    with dask.config.set(trust_config(authority, "alice")), Client(address, timeout=bound(60)) as as_client:
        with pytest.raises(PermissionError, match="rqml_reconcile: the certificate of alice has role client"):
            as_client.sync(as_client.scheduler.rqml_reconcile, node="x", tasks=[])
        assert as_client.sync(as_client.scheduler.rqml_status)["nodes"]  # a client reads the status
        # a node takes supervision from the scheduler only, not from a client that connects to it
        [worker] = as_client.scheduler_info()["workers"]
        with pytest.raises(PermissionError, match="rqml_decide: the certificate of alice has role client"):
            as_client.sync(as_client.rpc(worker).rqml_decide, decision={"key": "x@0", "action": "terminate"})
        with pytest.raises(PermissionError, match="rqml_quarantined: the certificate of alice has role client"):
            as_client.sync(as_client.rpc(worker).rqml_quarantined, quarantined={})


def test_rqml_run_secure_runs_the_embedded_cluster_over_pqtls_with_the_same_result(tmp_path, small_volume):
    import numpy as np
    import zarr

    from conftest import pipeline_dict, write_yaml

    outputs = {}
    for mode in ("plain", "secure"):
        config = pipeline_dict(small_volume, tmp_path / f"{mode}.zarr", cluster={"n_workers": 2, "dashboard_address": "127.0.0.1:0"})
        # nothing reused between the two; the records kept, to look at their signatures
        config["checkpoint"] = {"artifacts": str(tmp_path / f"{mode}-checkpoints"), "every_iterations": 10, "retention": "keep"}
        done = subprocess.run([sys.executable, "-m", "rqml_dask.cli", "run", str(write_yaml(tmp_path / f"{mode}.yaml", config)),
                               "--no-progress", *(["--secure"] if mode == "secure" else [])],
                              capture_output=True, text=True, timeout=bound(300), cwd=tmp_path,
                              env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")})  # --secure keeps its CA there
        assert done.returncode == 0, done.stderr[-3000:]
        group = zarr.open_group(tmp_path / f"{mode}.zarr", mode="r")
        assert group.attrs["rqml"]["status"] == "complete"
        outputs[mode] = group["deconvolved"][...]
    assert "certificate scheduler, key exchange X25519MLKEM768" in done.stderr
    np.testing.assert_array_equal(outputs["secure"], outputs["plain"])
    assert not list(Path(tempfile.gettempdir()).glob("rqml-secure-*"))  # the run's certificates are gone, its CA kept
    assert (tmp_path / "config" / "rqml" / "secure-ca" / "ca.pem").exists()
    from rqml_dask.checkpoint import TaskCheckpoint
    from rqml_dask.stores.base import decode_slot
    from rqml_dask.stores.lmdb_store import LMDBStore

    signers = {}
    for mode in ("plain", "secure"):
        [path] = (tmp_path / f"{mode}-checkpoints" / "nodes").glob("*.lmdb")
        store = LMDBStore(path)
        with store.env.begin(db=store._slots) as txn:
            records = [TaskCheckpoint.from_msgpack(e.record) for _, slot in txn.cursor() for e in decode_slot(slot)]
        assert records
        signers[mode] = {(r.signature or {}).get("signer") for r in records}
    assert signers == {"plain": {None}, "secure": {"node-0", "node-1"}}  # over pqtls every record is signed


def test_a_done_marker_changed_on_disk_is_refused_and_the_task_computed_again(tmp_path, authority, pq_scheduler, small_volume):
    import json

    from rqml_dask import Pipeline, events
    from rqml_dask.pipeline import load_pipeline_config
    from rqml_dask.stores.lmdb_store import LMDBStore

    from conftest import pipeline_dict, write_yaml

    address, _ = pq_scheduler
    config = pipeline_dict(small_volume, tmp_path / "out.zarr")
    pipeline = Pipeline(load_pipeline_config(write_yaml(tmp_path / "p.yaml", config)))
    with dask.config.set(trust_config(authority, "alice")), Client(address, timeout=bound(60)) as client:
        first = pipeline.run(client, progress=False)
        [path] = (Path(pipeline.checkpoint_settings.artifacts) / "nodes").glob("*.lmdb")
        store = LMDBStore(path)
        with store.env.begin(write=True, db=store._done) as txn:  # an attacker with the disk: claim more work was done
            keys = [key for key, _ in txn.cursor()]
            marker = json.loads(txn.get(keys[0]))
            assert marker["signature"]["signer"] == "node-a"
            marker["iterations"] += 1000
            txn.put(keys[0], json.dumps(marker).encode())
        second = pipeline.run(client, progress=False, overwrite=True)
        alerts = [e for _, e in client.get_events(events.ALERTS) if e.get("kind") == "outcome-rejected"]
    assert all(o.accepted for o in first.outcomes)
    first_run = {o.task_id: o for o in first.outcomes}
    # neither reused nor the first run's own outcome (Dask may still hold a key the first run
    # finished, not yet released, and the second run then joins it)
    recomputed = [o for o in second.outcomes if not o.reused and o != first_run[o.task_id]]
    assert [o.task_id for o in recomputed] == [marker["task_id"]]
    assert recomputed[0].iterations == next(o.iterations for o in first.outcomes if o.task_id == marker["task_id"])
    assert any("does not match the record" in a["reason"] for a in alerts), alerts


def test_short_lived_certificates_are_renewed_through_the_scheduler_without_interrupting_a_run(tmp_path, small_volume):
    """Node and scheduler certificates of 20 s: each is renewed from the CA the scheduler
    holds, a run across several renewals completes with the right result, the node signs
    with its new key, connections opened after the first certificates expired succeed, and
    every certificate issued verifies with plain cryptography calls."""
    from heterogeneous_cluster import sleepy_pipeline, sleepy_result

    directory = tmp_path / "ca"
    ca.init(directory)
    short = 20 / 3600
    first_scheduler = x509.load_pem_x509_certificates(ca.issue(directory, "scheduler", "scheduler", hours=short).cert.read_bytes())[0]
    ca.issue(directory, "alice", "client")
    node_files = tmp_path / "node-s"  # the node's own copy, as on its own host
    node = ca.issue(directory, "node-s", "node", hours=short, out=node_files)
    original = x509.load_pem_x509_certificates(node.cert.read_bytes())[0]
    session = {"DASK_RQML__TRUST__SESSION__LIFETIME": "20s", "DASK_RQML__TRUST__SESSION__CHECK_INTERVAL": "1s"}
    port = free_port()
    address = f"pqtls://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--protocol", "pqtls", "--host", "127.0.0.1",
         "--port", str(port), "--dashboard-address", "127.0.0.1:0", "--preload", "rqml_dask.scheduler"],
        env={**os.environ, **trust_env(directory, "scheduler"), **session, **ADMIN, "DASK_RQML__TRUST__SESSION__AUTHORITY": str(directory)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    node_env = {"DASK_RQML__TRUST__CA": str(directory / "ca.pem"), "DASK_RQML__TRUST__CERT": str(node.cert),
                "DASK_RQML__TRUST__KEY": str(node.key), "PYTHONPATH": str(Path(__file__).parent)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--preload-nanny", "rqml_dask.node", "--name", "node-s",
         "--dashboard-address", "127.0.0.1:0"],
        env={**os.environ, **node_env, **session}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with dask.config.set(trust_config(directory, "alice")), Client(address, timeout=bound(60)) as client:
            client.wait_for_workers(1, timeout=bound(60))
            [worker_address] = client.scheduler_info()["workers"]
            pipeline = sleepy_pipeline(small_volume, tmp_path / "out.zarr", [24, 48, 48], 300, 0.1, "renewed")
            futures = pipeline.submit(client)  # about 30 s of refining on the one node
            serials = {original.serial_number}

            def renewals() -> int:
                serials.add(x509.load_pem_x509_certificates(node.cert.read_bytes())[0].serial_number)
                return len(serials) - 1

            wait_for(lambda: renewals() >= 2, timeout=90, interval=0.5, what="two renewals of the node's certificate")
            outcomes = client.gather(futures)
            wait_for(lambda: utc_now() > original.not_valid_after_utc, timeout=60, what="the first certificates expired")

            # the node kept its place (never quarantined), and opens new connections with its renewed certificate
            assert list(client.scheduler_info()["workers"]) == [worker_address]
            state = client.sync(client.scheduler.rqml_status)
            assert state["quarantined"] == {} and state["nodes"][worker_address]["identity"]["renewed"]

            async def fresh_connection(dask_worker):
                from distributed.comm import connect

                comm = await connect(dask_worker.scheduler.address)
                try:
                    return comm.peer_name, comm.peer_certificate.serial_number
                finally:
                    await comm.close()

            peer_name, scheduler_serial = client.run(fresh_connection)[worker_address]
            assert peer_name == "scheduler"
            assert scheduler_serial != first_scheduler.serial_number  # the scheduler renewed its own too
        with dask.config.set(trust_config(directory, "alice")), Client(address, timeout=bound(60)) as late:
            assert late.submit(lambda: 5).result(timeout=bound(60)) == 5  # a handshake after every first certificate expired

        # the run is right, and its results are signed with renewed keys
        assert all(o.state == "accepted" and o.iterations == 300 for o in outcomes), outcomes
        np.testing.assert_array_equal(zarr.open_group(tmp_path / "out.zarr", mode="r")["deconvolved"][...],
                                      sleepy_result(small_volume, 300))

        # every certificate issued verifies with plain cryptography calls: the CA's signature, name, role, life
        root = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        renewed = x509.load_pem_x509_certificates(node.cert.read_bytes())[0]
        root.public_key().verify(renewed.signature, renewed.tbs_certificate_bytes)
        assert ca.name_of(renewed) == "node-s" and ca.role_of(renewed) == "node"
        assert (renewed.not_valid_after_utc - renewed.not_valid_before_utc).total_seconds() == pytest.approx(22, abs=1)
        assert stat.S_IMODE(node.key.stat().st_mode) == 0o600
        recorded = {int(line) for line in (directory / "issued" / "node-s.serials").read_text().split()}
        assert serials <= recorded  # what `rqml ca revoke node-s` revokes
        signers = {x509.load_pem_x509_certificate(o.signature["certificate"].encode()).serial_number for o in outcomes}
        assert signers and signers <= recorded - {original.serial_number}  # signed with a renewed key
    finally:
        for process in (worker, scheduler):
            process.kill()
            process.wait(timeout=bound(30))


def test_a_node_whose_certificate_expires_unrenewed_is_quarantined(authority, pq_scheduler):
    """The module's scheduler holds no CA: the node's renewal is refused, and when its 15 s
    certificate expires the node is quarantined, removed, and says why."""
    from rqml_dask import events

    address, _ = pq_scheduler
    credential = ca.issue(authority, "node-e", "node", hours=15 / 3600)
    expires = x509.load_pem_x509_certificates(credential.cert.read_bytes())[0].not_valid_after_utc
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--name", "node-e",
         "--dashboard-address", "127.0.0.1:0", "--no-nanny"],
        env={**os.environ, **trust_env(authority, "node-e"), "DASK_RQML__TRUST__SESSION__CHECK_INTERVAL": "1s"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with dask.config.set(trust_config(authority, "alice")), Client(address, timeout=bound(60)) as client:
            wait_for(lambda: "node-e" in [w["name"] for w in client.scheduler_info()["workers"].values()], what="node-e registered")
            reason = wait_for(lambda: client.sync(client.scheduler.rqml_status)["quarantined"].get("node-e"), timeout=60,
                              what="node-e quarantined once its certificate expired")
            assert reason == f"its certificate expired at {expires:%Y-%m-%d %H:%M:%S} UTC"
            assert utc_now() >= expires
            wait_for(lambda: "node-e" not in [w["name"] for w in client.scheduler_info()["workers"].values()], what="node-e removed")
            alerts = [e for _, e in client.get_events(events.ALERTS) if e.get("node_name") == "node-e"]
            assert [a["kind"] for a in alerts if a["kind"] == "node-quarantined"] == ["node-quarantined"]
            client.sync(client.scheduler.rqml_quarantine, release="node-e")  # leave the module's scheduler as it was
        assert worker.wait(timeout=bound(60)) is not None
    finally:
        worker.kill()


def test_revoking_a_name_revokes_its_session_certificates_too(tmp_path):
    ca.init(tmp_path)
    node = ca.issue(tmp_path, "node-r", "node")
    holder = x509.load_pem_x509_certificates(node.cert.read_bytes())[0]
    from rqml_dask.trust.session import signing_request

    _, request = signing_request("node-r")
    chain = ca.Authority.load(tmp_path).session(x509.load_pem_x509_csr(request.encode()), holder, 60)
    session = x509.load_pem_x509_certificates(chain)[0]
    assert ca.name_of(session) == "node-r" and ca.role_of(session) == "node"
    _, other = signing_request("node-x")  # a request naming another node is refused
    with pytest.raises(ca.CAError, match="names 'node-x'"):
        ca.Authority.load(tmp_path).session(x509.load_pem_x509_csr(other.encode()), holder, 60)
    ca.revoke(tmp_path, "node-r")
    assert {entry.serial_number for entry in ca.load_crl(tmp_path / "crl.pem")} == {holder.serial_number, session.serial_number}


def lying_node(authority: Path, address: str, name: str, attack: str, **env: str) -> subprocess.Popen:
    """A worker process with a genuine node certificate that lies about its results as ``attack`` says
    (tests/lying_node.py; ``""``: an honest one)."""
    ca.issue(authority, name, "node")
    tests = str(Path(__file__).parent)
    return subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--name", name,
         "--dashboard-address", "127.0.0.1:0", "--no-nanny", "--preload", "lying_node"],
        env={**os.environ, **trust_env(authority, name), "RQML_ATTACK": attack, **env,
             "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def run_against(authority: Path, address: str, liar: str, config: dict, tmp_path: Path, name: str, honest: tuple[str, ...] = ("node-a",)):
    """Run ``config`` on the module's cluster with the node ``liar`` in it, once it and the
    ``honest`` nodes are registered; the report, the workers' names by address, the alerts
    about ``liar`` and the quarantine."""
    from rqml_dask import Pipeline, events
    from rqml_dask.pipeline import load_pipeline_config

    from conftest import write_yaml

    pipeline = Pipeline(load_pipeline_config(write_yaml(tmp_path / f"{name}.yaml", config)))
    with dask.config.set(trust_config(authority, "alice")), Client(address, timeout=bound(60)) as client:
        wait_for(lambda: {liar, *honest} <= {w["name"] for w in client.scheduler_info()["workers"].values()},
                 what=f"{liar} and {', '.join(honest)} registered")
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
        report = run_or_explain(pipeline, client, bound(120))  # a hang shows where each task is
        alerts = [e for _, e in client.get_events(events.ALERTS) if e.get("node_name") == liar]
        quarantined = client.sync(client.scheduler.rqml_status)["quarantined"]
        if liar in quarantined:
            client.sync(client.scheduler.rqml_quarantine, release=liar)  # leave the module's scheduler as it was
    return report, names, alerts, quarantined


def assert_nothing_of(liar: str, report, names: dict, reference: np.ndarray, output: Path) -> None:
    """Every task accepted, each from an honest node that signed it, and the output that of an honest run."""
    assert all(o.accepted for o in report.outcomes) and len(report.outcomes) == 8
    assert {names[o.node] for o in report.outcomes} == {"node-a"}
    assert {o.signature["signer"] for o in report.outcomes} == {"node-a"}
    np.testing.assert_array_equal(zarr.open_group(output, mode="r")["deconvolved"][...], reference)


@pytest.fixture(scope="module")
def honest_output(pq_scheduler, authority, small_volume, tmp_path_factory) -> np.ndarray:
    """The output of the test pipeline on node-a alone."""
    from rqml_dask import Pipeline
    from rqml_dask.pipeline import load_pipeline_config

    from conftest import pipeline_dict, write_yaml

    tmp = tmp_path_factory.mktemp("honest")
    pipeline = Pipeline(load_pipeline_config(write_yaml(tmp / "p.yaml", pipeline_dict(small_volume, tmp / "out.zarr"))))
    with dask.config.set(trust_config(authority, "alice")), Client(pq_scheduler[0], timeout=bound(60)) as client:
        assert all(o.accepted for o in pipeline.run(client, progress=False).outcomes)
    return zarr.open_group(tmp / "out.zarr", mode="r")["deconvolved"][...]


@pytest.mark.parametrize("attack, reason", [
    ("tamper", "does not match the record"),  # changed after it was signed
    ("unsigned", "without presenting it signed"),  # never shown to the scheduler
])
def test_a_node_whose_result_does_not_prove_itself_is_quarantined_and_nothing_it_returned_is_accepted(
        tmp_path, authority, pq_scheduler, small_volume, honest_output, attack, reason):
    from conftest import pipeline_dict

    address, _ = pq_scheduler
    liar = f"node-{attack}"
    worker = lying_node(authority, address, liar, attack)
    try:
        config = pipeline_dict(small_volume, tmp_path / "out.zarr")
        report, names, alerts, quarantined = run_against(authority, address, liar, config, tmp_path, attack)
    finally:
        worker.kill()
    assert reason in quarantined[liar], quarantined
    assert [a["kind"] for a in alerts if a["kind"] == "node-quarantined"] == ["node-quarantined"]
    assert all(a["security"] for a in alerts) and any(reason in a["reason"] for a in alerts), alerts
    assert_nothing_of(liar, report, names, honest_output, tmp_path / "out.zarr")


def test_a_node_replaying_results_it_signed_before_is_quarantined_and_none_of_them_accepted(
        tmp_path, authority, pq_scheduler, small_volume, honest_output):
    from conftest import pipeline_dict

    address, _ = pq_scheduler
    record = tmp_path / "signed-results.jsonl"
    worker = lying_node(authority, address, "node-replay", "replay", RQML_ATTACK_FILE=str(record))
    try:
        first, names, alerts, quarantined = run_against(  # honest the first time: what it presents, it records
            authority, address, "node-replay", pipeline_dict(small_volume, tmp_path / "first.zarr"), tmp_path, "first")
        assert all(o.accepted for o in first.outcomes) and not quarantined and not alerts
        assert record.is_file() and "node-replay" in {names[o.node] for o in first.outcomes}
        (tmp_path / "signed-results.jsonl.replay").touch()  # now it replays them instead of presenting new results
        config = pipeline_dict(small_volume, tmp_path / "second.zarr")  # checkpoints beside it: nothing reused
        second, names, alerts, quarantined = run_against(authority, address, "node-replay", config, tmp_path, "second")
    finally:
        worker.kill()
    assert "replay" in quarantined["node-replay"], quarantined
    assert any(a["kind"] == "result-refused" and "replay" in a["reason"] for a in alerts), alerts
    assert_nothing_of("node-replay", second, names, honest_output, tmp_path / "second.zarr")


def test_a_node_whose_results_keep_losing_cross_node_votes_is_quarantined(tmp_path, authority, small_volume):
    """Its results are signed and verify, but they are wrong: the honest node's votes on them
    disagree, each lost vote lowers its reliability, and the third in a row (the default
    rqml.scheduler.lost-votes) while the honest node's results pass puts it in quarantine.
    Its results are rejected, never accepted, and no honest node is quarantined (two of them:
    when the liar is removed, Dask moves what it held and what depended on it, and a result an
    honest node then presents for a task no longer running there is stale, not a fault). Runs follow
    each other until then (which node computes and which votes is the placement's choice: a
    run may give the liar one result)."""
    from rqml_dask import Pipeline, events
    from rqml_dask.pipeline import load_pipeline_config

    from conftest import pipeline_dict, write_yaml

    address, scheduler = start_pq_scheduler(authority, tmp_path)
    liar = "node-wrong"
    workers = [lying_node(authority, address, liar, "wrong-results"),
               *(lying_node(authority, address, name, "") for name in ("node-fair", "node-square"))]
    outcomes, quarantined = [], {}
    try:
        with dask.config.set(trust_config(authority, "alice")), Client(address, timeout=bound(60)) as client:
            wait_for(lambda: len(client.scheduler_info()["workers"]) == 3, what="the three nodes registered")
            names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
            for run in range(6):
                config = pipeline_dict(small_volume, tmp_path / f"out{run}.zarr", tiling={"tile": [12, 12, 24]},
                                       models={"ladder": ["richardson_lucy"]},
                                       convergence={"max_iterations": 10 + run, "check_every": 5, "stability_tol": 0, "consistency_tol": 0,
                                                    "novelty_window": 1000, "accept_max_iterations": True},  # a new task each run
                                       validation={"vote_models": ["richardson_lucy"], "vote_tolerance": 0.1})
                pipeline = Pipeline(load_pipeline_config(write_yaml(tmp_path / f"p{run}.yaml", config)))
                report = pipeline.run(client, progress=False)
                assert len(report.outcomes) == 16
                outcomes += report.outcomes
                if quarantined := client.sync(client.scheduler.rqml_status)["quarantined"]:
                    break
            alerts = [e for _, e in client.get_events(events.ALERTS) if e.get("node_name") == liar]
    finally:
        for process in [*workers, scheduler]:
            process.kill()
    assert list(quarantined) == [liar]
    assert re.fullmatch(r"its results lost \d+ cross-node votes in a row in run [\w.-]+ while other nodes' results passed theirs", quarantined[liar])
    lost = [a for a in alerts if a["kind"] == "vote-lost"]
    assert [a["lost_in_a_row"] for a in lost] == list(range(1, len(lost) + 1)) and len(lost) >= 3
    assert all(abs(a["difference"] - 1 / 3) < 1e-3 for a in lost)  # |x - 1.5 x| / |1.5 x|
    assert any(a["kind"] == "node-quarantined" and a["security"] for a in alerts)
    honest = [o for o in outcomes if names[o.node] != liar]
    assert honest and all(o.accepted and o.vote["agreed"] for o in honest), [(o.task_id, names[o.node], o.validation_failures, o.vote) for o in honest if not o.accepted]
    assert all(not o.accepted and o.validation_failures[-1].startswith("vote: richardson_lucy differs by 0.333")
               for o in outcomes if names[o.node] == liar)


@pytest.mark.slow
def test_the_secure_embedded_scheduler_presents_and_signs_as_itself_while_its_process_holds_the_client(tmp_path, monkeypatch):
    """``rqml run --secure`` holds the scheduler and a client in one process, with the client's
    credentials in ``rqml.trust`` during the run: the scheduler still calls its nodes as the
    scheduler (they answer only its certificate) and signs a policy set during the run with
    its own key (nodes enforce only one their scheduler signed)."""
    from rqml_dask.deploy.local import secure_embedded_cluster
    from rqml_dask.pipeline.config import ClusterSpec

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))

    async def call_nodes(dask_scheduler):
        answers = {}
        for address in dask_scheduler.workers:
            try:
                answers[address] = await dask_scheduler.rpc(address).rqml_progress(keys=[])
            except Exception as exc:
                answers[address] = f"{type(exc).__name__}: {exc}"
        return answers

    with secure_embedded_cluster(ClusterSpec(n_workers=2, dashboard_address="127.0.0.1:0")) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=bound(60))
        assert client.scheduler_comm.comm.extra_info()["peer_name"] == "scheduler"
        assert client.run_on_scheduler(call_nodes) == {address: {} for address in client.scheduler_info()["workers"]}
        adopted = client.sync(client.scheduler.rqml_policy, policy={"max_inbound": 7})
        version = adopted["version"]
        status = wait_for(lambda: (s := client.sync(client.scheduler.rqml_status, limit=0))
                          and all(n["policy_version"] == version for n in s["nodes"].values()) and s,
                          what="both nodes enforcing the policy set during the run")
        assert len(status["nodes"]) == 2
