"""Policy by the scheduler, not by the caller: numbered and signed by the scheduler, checked
by nodes, bounded, runnable, and shown as each node enforces it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import dask
import pytest
from distributed import Client

from rqml_dask import events
from rqml_dask.messages import POLICY, InvalidPolicy, NodePolicy, read_policy
from rqml_dask.node.policy import PolicyGate
from rqml_dask.scheduler import policy as policies
from rqml_dask.trust import ca
from rqml_dask.trust.policy import PolicySeal, PolicyVerifier
from rqml_dask.trust.signing import SignatureError

from conftest import pipeline_dict, write_yaml
from dask_processes import DaskProcess, rqml_worker
from etcd_server import free_port
from timing import bound, wait_for

TESTS = Path(__file__).parent


# -- the rules, in one process ---------------------------------------------------------------


@pytest.mark.parametrize(("fields", "error"), [
    ({"max_task_seconds": 0.5}, "max_task_seconds: Input should be greater than or equal to 1 (got 0.5)"),
    ({"max_task_seconds": float("nan")}, "max_task_seconds: "),
    ({"min_concurrency": 9}, "min_concurrency: 9 is above max_concurrency=8"),
    ({"max_concurrency": 0}, "max_concurrency: Input should be greater than or equal to 1"),
    ({"max_inbound": 10**6}, "max_inbound: Input should be less than or equal to 10000"),
    ({"gpu_classes": ["x" * 101]}, "gpu_classes.0: String should have at most 100 characters"),
    ({"class_order": [f"c{i}" for i in range(101)]}, "class_order: Tuple should have at most 100 items"),
    ({"on_validation_failure": "ignore"}, "on_validation_failure: Input should be 'escalate' or 'reject'"),
    ({"bogus": 1}, "bogus: Unexpected keyword argument"),
    ("max_task_seconds=1", "policy: expected a mapping of policy fields, got str"),
])
def test_a_policy_out_of_its_bounds_is_refused_naming_the_field(fields, error):
    with pytest.raises(InvalidPolicy) as refused:
        read_policy(fields)
    assert str(refused.value).startswith(error), refused.value


def test_the_scheduler_numbers_policies_and_a_callers_version_and_signature_are_ignored():
    proposed = read_policy({"version": 2**62, "signature": {"signer": "mallory"}, "max_task_seconds": 60})
    assert proposed.version == 0 and proposed.signature is None and proposed.max_task_seconds == 60
    first = policies.issue(proposed, None, credentials=None)
    assert first.version >= time.time_ns() // 1_000_000 - 60_000  # above any of an earlier run of the scheduler
    later = [first]
    for _ in range(3):
        later.append(policies.issue(proposed, later[-1], credentials=None))
    assert [p.version for p in later] == sorted({p.version for p in later})  # strictly rising
    assert policies.summary(first) == {"version": first.version, "class_order": ["deconvolution"], "min_concurrency": 1,
                                       "max_concurrency": 8, "on_validation_failure": "escalate", "max_task_seconds": 60.0,
                                       "diversity": {"deconvolution": ["landweber"]}, "gpu_classes": [], "max_inbound": 4,
                                       "signed_by": None}


def test_a_policy_leaving_no_node_able_to_run_a_class_is_refused_while_nodes_are_there():
    gpu = NodePolicy(gpu_classes=("deconvolution",))
    refused = policies.refusal(gpu, nodes=2, gpu_nodes=0)
    assert str(refused) == ("gpu_classes: ['deconvolution'] would leave no node able to run deconvolution tasks: "
                            "none of the 2 node(s) has a GPU")
    assert policies.refusal(gpu, nodes=2, gpu_nodes=1) is None
    assert policies.refusal(gpu, nodes=0, gpu_nodes=0) is None  # no node yet: its tasks fail later if none comes
    assert policies.refusal(NodePolicy(), nodes=2, gpu_nodes=0) is None


@pytest.fixture(scope="module")
def cluster_ca(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("policy-ca")
    ca.init(directory)
    for name, role in (("scheduler", "scheduler"), ("scheduler-b", "scheduler"), ("node-a", "node")):
        ca.issue(directory, name, role)
    return directory


def seal(directory: Path, name: str) -> PolicySeal:
    return PolicySeal.load(directory / "ca.pem", directory / "issued" / f"{name}.pem", directory / "issued" / f"{name}-key.pem", None)


def test_a_node_takes_only_a_policy_its_scheduler_signed(cluster_ca, tmp_path):
    verifier = PolicyVerifier.load(cluster_ca / "ca.pem", None)
    signed = seal(cluster_ca, "scheduler").sign_policy(NodePolicy(version=7, max_task_seconds=60.0))
    assert verifier.verify_policy(signed, "scheduler") == "scheduler"
    with pytest.raises(SignatureError, match="does not match the record"):
        verifier.verify_policy(replace(signed, max_task_seconds=1.0), "scheduler")  # changed after it was signed
    with pytest.raises(SignatureError, match="does not match the record"):
        verifier.verify_policy(replace(signed, version=2**62), "scheduler")
    with pytest.raises(SignatureError, match="unsigned"):
        verifier.verify_policy(NodePolicy(version=2**62))
    with pytest.raises(SignatureError, match="whose certificate has role node: only a scheduler signs policies"):
        verifier.verify_policy(seal(cluster_ca, "node-a").sign_policy(signed))
    with pytest.raises(SignatureError, match="signed by scheduler-b, not by scheduler, the scheduler this node is connected to"):
        verifier.verify_policy(seal(cluster_ca, "scheduler-b").sign_policy(signed), "scheduler")
    other = tmp_path / "other-ca"
    ca.init(other)
    ca.issue(other, "scheduler", "scheduler")
    with pytest.raises(SignatureError, match="not from this cluster's CA"):
        verifier.verify_policy(seal(other, "scheduler").sign_policy(signed), "scheduler")


def test_a_saved_policy_no_scheduler_of_the_cluster_signed_is_dropped_and_one_of_another_is_replaced(cluster_ca):
    gate = PolicyGate(PolicyVerifier.load(cluster_ca / "ca.pem", None))
    hostile = NodePolicy(version=2**62, max_task_seconds=1.0)
    kept, dropped = gate.saved(hostile)
    assert kept is None and dropped.startswith(f"the saved policy version {2**62} is not one a scheduler of this cluster signed: unsigned")
    elsewhere = seal(cluster_ca, "scheduler-b").sign_policy(hostile)
    assert gate.saved(elsewhere) == (elsewhere, None)  # enforced until its scheduler says otherwise
    ours = seal(cluster_ca, "scheduler").sign_policy(NodePolicy(version=5))
    assert gate.received(POLICY.dump_python(ours, mode="json"), "scheduler") == ours
    assert PolicyGate.replaced(elsewhere, ours) == f"dropped policy version {2**62} signed by scheduler-b: this node's scheduler is scheduler"
    assert PolicyGate.replaced(ours, replace(ours, version=6)) is None
    assert PolicyGate.replaced(hostile, NodePolicy(version=5)) == (
        f"dropped policy version {2**62}: numbered above the scheduler's own (version 5), it is not the scheduler's")
    assert PolicyGate(None).saved(hostile) == (hostile, None)  # over tcp:// nothing is signed; registration replaces it


# -- real processes ----------------------------------------------------------------------------


def scheduler_process(port: int, log: Path, env: dict[str, str] | None = None, protocol: str = "tcp") -> DaskProcess:
    """``dask scheduler --preload rqml_dask.scheduler`` on loopback, at ``port``."""
    return DaskProcess(["scheduler", "--protocol", protocol, "--host", "127.0.0.1", "--port", str(port),
                        "--dashboard-address", "127.0.0.1:0", "--preload", "rqml_dask.scheduler"], log, env)


def rqml(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rqml_dask.cli", *args], capture_output=True, text=True, timeout=bound(180),
                          env={**os.environ, "PYTHONPATH": str(TESTS), **(env or {})})


def enforced(client: Client) -> tuple[int, dict[str, int]]:
    """The scheduler's policy version, and the one each node enforces (by name), from ``rqml_status``."""
    state = client.sync(client.scheduler.rqml_status)
    names = {address: info["name"] for address, info in client.scheduler_info()["workers"].items()}
    return state["policy"]["version"], {names.get(a, a): n["policy_version"] for a, n in state["nodes"].items()}


def in_step(client: Client, version: int) -> bool:
    current, nodes = enforced(client)
    return current == version and bool(nodes) and all(v == version for v in nodes.values())


@pytest.mark.slow
def test_gpu_classes_on_a_cpu_cluster_fail_the_run_with_the_reason_and_are_refused_once_nodes_are_there(tmp_path, small_volume):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    with scheduler_process(port, tmp_path / "scheduler.log", {"DASK_RQML__SCHEDULER__CAPABLE_NODE_GRACE": "2s"}):
        with Client(address, timeout=bound(60)) as client:
            # no node yet: nothing to judge the policy by, so it is taken
            taken = client.sync(client.scheduler.rqml_policy, policy={"gpu_classes": ["deconvolution"]})
            assert list(taken["gpu_classes"]) == ["deconvolution"]
            with rqml_worker(address, "cpu-0", free_port(), tmp_path / "workers"):
                client.wait_for_workers(1, timeout=bound(60))
                config = write_yaml(tmp_path / "p.yaml", pipeline_dict(small_volume, tmp_path / "out.zarr"))
                started = time.monotonic()
                run = rqml("run", str(config), "--scheduler", address, "--no-progress")  # bounded: no silent hang
                assert run.returncode != 0, run.stdout + run.stderr
                assert "no node can run deconvolution tasks: the policy's gpu_classes ['deconvolution'] places them on GPU " \
                       "nodes only, and none of the 1 node(s) has had a GPU" in run.stderr, run.stderr[-3000:]
                assert time.monotonic() - started < bound(90)
                alerts = [e for _, e in client.get_events(events.ALERTS) if e["kind"] == "no-capable-node"]
                assert alerts and all(a["reason"].startswith("no node can run deconvolution tasks") for a in alerts)
                # now the cluster has a node: a policy that leaves it nothing to run is refused at once
                with pytest.raises(InvalidPolicy, match=r"gpu_classes: \['deconvolution'\] would leave no node able to run "
                                                        r"deconvolution tasks: none of the 1 node\(s\) has a GPU"):
                    client.sync(client.scheduler.rqml_policy, policy={"gpu_classes": ["deconvolution"]})
                with pytest.raises(InvalidPolicy, match=r"max_task_seconds: Input should be greater than or equal to 1 \(got 0.5\)"):
                    client.sync(client.scheduler.rqml_policy, policy={"max_task_seconds": 0.5})
                assert client.sync(client.scheduler.rqml_policy)["version"] == taken["version"]  # both refused: unchanged

                # rqml status shows what each node enforces
                fixed = client.sync(client.scheduler.rqml_policy, policy={"max_task_seconds": 600})
                wait_for(lambda: in_step(client, fixed["version"]), timeout=30, what="the node enforcing the new policy")
                status = rqml("status", "--scheduler", address)
                assert status.returncode == 0, status.stderr
                assert f"  enforces policy version {fixed['version']}\n" in status.stdout, status.stdout
                assert f"policy version {fixed['version']} (the scheduler's, unsigned)" in status.stdout, status.stdout


@pytest.mark.slow
def test_a_hostile_policy_version_does_not_stick_and_a_saved_one_the_scheduler_did_not_sign_is_dropped_at_registration(
        tmp_path, cluster_ca):
    from test_trust import trust_config, trust_env

    ca.issue(cluster_ca, "alice", "client")
    port = free_port()
    address = f"pqtls://127.0.0.1:{port}"
    workers = tmp_path / "workers"
    node = lambda: rqml_worker(address, "node-a", free_port(), workers, env=trust_env(cluster_ca, "node-a"))  # noqa: E731
    start = lambda log: scheduler_process(port, tmp_path / log, trust_env(cluster_ca, "scheduler"), "pqtls")  # noqa: E731
    with dask.config.set(trust_config(cluster_ca, "alice")):
        with start("scheduler.log"), node():
            with Client(address, timeout=bound(60)) as client:
                client.wait_for_workers(1, timeout=bound(60))
                hostile = client.sync(client.scheduler.rqml_policy, policy={"version": 2**62, "max_task_seconds": 1.0})
                assert hostile["version"] < 2**62 and hostile["signed_by"] == "scheduler"  # the scheduler's number
                operator = client.sync(client.scheduler.rqml_policy, policy={"max_task_seconds": 3600.0})
                assert operator["version"] > hostile["version"]  # a later policy wins, whatever a caller asked
                wait_for(lambda: in_step(client, operator["version"]), timeout=30, what="node-a enforcing the operator's policy")
        [saved] = workers.rglob("rqml-node/node-a/policy.json")
        on_disk = NodePolicy.load(saved)
        assert on_disk.version == operator["version"] and on_disk.signature["signer"] == "scheduler"

        # while both are down, the node's saved policy is replaced by one signed by another
        # scheduler of the same CA, numbered above anything
        seal(cluster_ca, "scheduler-b").sign_policy(NodePolicy(version=2**62, max_task_seconds=1.0)).save(saved)
        with start("scheduler-2.log"), node():
            with Client(address, timeout=bound(60)) as client:
                client.wait_for_workers(1, timeout=bound(60))
                version, _ = enforced(client)
                wait_for(lambda: in_step(client, version), timeout=30, what="node-a enforcing the restarted scheduler's policy")
                dropped = wait_for(lambda: [e for _, e in client.get_events(events.ALERTS) if e["kind"] == "policy-dropped"],
                                   timeout=30, what="the policy-dropped alert")
                assert dropped[0]["reason"] == f"dropped policy version {2**62} signed by scheduler-b: this node's scheduler is scheduler"
                assert dropped[0]["version"] == version
        assert NodePolicy.load(saved).version == version and NodePolicy.load(saved).max_task_seconds is None
