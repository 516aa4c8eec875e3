"""Checkpoint records signed with the writing node's ML-DSA-65 key (pqtls:// clusters):
verifiable with plain cryptography calls, and every forged record refused on resume like a
damaged one, from LMDB and from a real etcd."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from cryptography import x509

from rqml_dask.checkpoint import TaskCheckpoint
from rqml_dask.node.checkpointer import Checkpointer
from rqml_dask.stores import open_store
from rqml_dask.stores.artifacts import ArtifactStore
from rqml_dask.stores.base import SlotEntry
from rqml_dask.stores.lmdb_store import LMDBStore
from rqml_dask.trust import ca
from rqml_dask.trust.signing import Seal, SignatureError

from test_checkpointing import run_with_checkpoints, task_with_checkpoints


@pytest.fixture(scope="module")
def authority(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ca")
    ca.init(directory)
    for name in ("node-a", "node-b", "node-c"):
        ca.issue(directory, name, "node")
    return directory


def seal_of(directory, name) -> Seal:
    return Seal.load(directory / "ca.pem", directory / "issued" / f"{name}.pem", directory / "issued" / f"{name}-key.pem",
                     directory / "crl.pem")


def record(iteration: int = 30, state: dict | None = None) -> TaskCheckpoint:
    from rqml_dask.checkpoint import ModelConfig

    return TaskCheckpoint.create("cp/0", iteration, ModelConfig("richardson_lucy", 0), (), state or {"runs": []})


def forged(signed: TaskCheckpoint, **changes) -> TaskCheckpoint:
    """What someone who can write the store makes: a changed record, its hash recomputed,
    the original signature kept."""
    changed = dataclasses.replace(signed, **changes)
    return dataclasses.replace(changed, hash=changed.compute_hash())


def test_a_signed_record_verifies_with_plain_cryptography_calls(authority):
    signed = seal_of(authority, "node-a").sign(record())
    signature = signed.signature
    certificate = x509.load_pem_x509_certificate(signature["certificate"].encode())
    message = msgpack.packb({"hash": signed.hash, "iteration": 30, "signed_at": signature["signed_at"], "task_id": "cp/0"})
    certificate.public_key().verify(bytes.fromhex(signature["value"]), message)  # raises if it does not verify
    assert signature["signer"] == "node-a" and signed.verify() is signed  # the signature is outside the hash
    assert TaskCheckpoint.from_msgpack(signed.to_msgpack()) == signed
    assert seal_of(authority, "node-b").verify(signed) == "node-a"


def test_forged_unsigned_and_foreign_records_are_refused(tmp_path, authority):
    reader, signed = seal_of(authority, "node-a"), seal_of(authority, "node-b").sign(record())
    with pytest.raises(SignatureError, match="does not match the record"):
        reader.verify(forged(signed, supervision_state={"runs": [], "injected": True}))
    with pytest.raises(SignatureError, match="does not match the record"):
        reader.verify(forged(signed, iteration=40))  # a replay of the record as a newer one
    with pytest.raises(SignatureError, match="unsigned"):
        reader.verify(record())
    other = tmp_path / "other-ca"
    ca.init(other)
    ca.issue(other, "node-a", "node")
    with pytest.raises(SignatureError, match="not from this cluster's CA"):
        reader.verify(seal_of(other, "node-a").sign(record()))
    ca.revoke(authority, "node-c")
    with pytest.raises(SignatureError, match="node-c, whose certificate is revoked"):
        reader.verify(seal_of(authority, "node-c").sign(record()))
    reader.quarantined["node-b"] = "its results keep losing votes"  # as the scheduler tells the node
    with pytest.raises(SignatureError, match=r"node-b, a node in quarantine \(its results keep losing votes\)"):
        reader.verify(signed)
    reader.quarantined.clear()  # released
    assert reader.verify(signed) == "node-b"


@pytest.mark.etcd
def test_a_record_changed_in_etcd_is_refused_and_the_task_resumes_from_the_last_signed_one(tmp_path, authority, etcd):
    alerts = []
    writer = Checkpointer(LMDBStore(tmp_path / "a.lmdb"), open_store(etcd.url), ArtifactStore(tmp_path / "artifacts"), "node-a",
                          seal=seal_of(authority, "node-a"))
    task = task_with_checkpoints(tmp_path, every_iterations=10)
    try:
        run_with_checkpoints(task, writer, stop_at=35)  # signed records at 10, 20, 30, in LMDB and etcd
    finally:
        writer.stop()
    shared = open_store(etcd.url)
    newest = TaskCheckpoint.from_msgpack(max(shared.checkpoints(task.key), key=lambda e: e.iteration).record)
    assert newest.iteration == 30 and newest.signature["signer"] == "node-a"
    attack = forged(newest, iteration=40)
    assert shared.put_checkpoint(task.key, SlotEntry(40, "node-a", attack.to_msgpack())) is not None  # it is the newest now
    reader = Checkpointer(LMDBStore(tmp_path / "b.lmdb"), shared, ArtifactStore(tmp_path / "artifacts"), "node-b",
                          on_alert=lambda kind, payload: alerts.append((kind, payload)), seal=seal_of(authority, "node-b"))
    try:
        resume = reader.latest(task)
    finally:
        reader.stop()
    assert resume.checkpoint.iteration == 30 and resume.checkpoint.signature["signer"] == "node-a"
    assert any("at iteration 40" in r and "does not match the record" in r for r in resume.rejected), resume.rejected
    assert [kind for kind, _ in alerts] == ["checkpoint-rejected"]


def test_an_outcome_is_signed_for_its_task_and_a_changed_one_is_refused(authority):
    from rqml_dask.messages import OUTCOME, TaskOutcome

    outcome = TaskOutcome(task_id="cp/0", state="rejected", status="converged", iterations=30, model="richardson_lucy",
                          escalations=0, models=[], convergence=None, validation_failures=["vote: x differs"], output="o",
                          elapsed_s=1.0, backend="numpy", input_digest="ab" * 16, result_digest="cd" * 16)
    key = "cp/0@" + "ef" * 8
    signed = OUTCOME.validate_json(OUTCOME.dump_json(seal_of(authority, "node-a").sign_outcome(outcome, key)))  # as stored
    # the format, with plain cryptography calls: the outcome's JSON without its signature, the key, the time
    signature = signed.signature
    message = OUTCOME.dump_json(dataclasses.replace(signed, signature=None)) + f"|{key}|{signature['signed_at']!r}".encode()
    x509.load_pem_x509_certificate(signature["certificate"].encode()).public_key().verify(bytes.fromhex(signature["value"]), message)
    reader = seal_of(authority, "node-b")
    assert reader.verify_outcome(signed, key) == "node-a"
    with pytest.raises(SignatureError, match="does not match the record"):
        reader.verify_outcome(dataclasses.replace(signed, state="accepted", validation_failures=[]), key)
    with pytest.raises(SignatureError, match="does not match the record"):  # the same outcome claimed for another task
        reader.verify_outcome(signed, "cp/1@" + "ef" * 8)
    with pytest.raises(SignatureError, match="unsigned"):
        reader.verify_outcome(outcome, key)


def test_the_scheduler_refuses_results_of_another_task_signer_time_or_presented_twice(authority):
    """What rqml_result checks (rqml_dask.scheduler.result_check), on real signatures."""
    from rqml_dask.messages import TaskOutcome
    from rqml_dask.scheduler.result_check import ResultCheck
    from rqml_dask.trust.signing import Verifier

    key = "t/0@" + "ab" * 8
    outcome = TaskOutcome(task_id="t/0", state="accepted", status="converged", iterations=30, model="richardson_lucy",
                          escalations=0, models=[], convergence=None, validation_failures=[], output="o", elapsed_s=1.0,
                          backend="numpy")
    check = ResultCheck(Verifier.load(authority / "ca.pem", authority / "crl.pem"), max_skew=30, remembered=2)
    signed = seal_of(authority, "node-a").sign_outcome(outcome, key)
    check.check(signed, key, "node-a", live=True)  # accepted
    with pytest.raises(SignatureError, match="replays a signed result presented at"):
        check.check(signed, key, "node-a", live=True)
    with pytest.raises(SignatureError, match="the result of t/1 replays an outcome of task t/0"):
        check.check(seal_of(authority, "node-a").sign_outcome(outcome, key), "t/1@" + "ab" * 8, "node-a", live=True)
    with pytest.raises(SignatureError, match="signed by node-a but presented by node-b"):
        check.check(seal_of(authority, "node-a").sign_outcome(outcome, key), key, "node-b", live=True)
    late = seal_of(authority, "node-a").sign_outcome(outcome, key)
    with pytest.raises(SignatureError, match=r"signed 4\d\.\d s ago, outside the 30 s skew window"):
        check.check(late, key, "node-a", live=True, now=late.signature["signed_at"] + 45)
    check.check(late, key, "node-a", live=False, now=late.signature["signed_at"] + 3600)  # finished in degraded mode, long ago
    early = seal_of(authority, "node-a").sign_outcome(outcome, key)
    with pytest.raises(SignatureError, match=r"signed 6\d\.\d s in the future"):
        check.check(early, key, "node-a", live=False, now=early.signature["signed_at"] - 60)
    check.verifier.quarantined["node-a"] = "its results keep losing votes"
    with pytest.raises(SignatureError, match="a node in quarantine"):
        check.check(seal_of(authority, "node-a").sign_outcome(outcome, key), key, "node-a", live=True)
    assert len(check.seen) == 2  # bounded
