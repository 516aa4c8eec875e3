"""Checkpoints with real LMDB and Zarr on disk: background writes, exact resumption,
damaged checkpoints rejected for the previous valid one, retention."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from rqml_dask.arrays import numpy_backend
from rqml_dask.node.checkpointer import Checkpointer
from rqml_dask.refinement import Refinement
from rqml_dask.stores.artifacts import ArtifactStore
from rqml_dask.stores.base import decode_slot, encode_slot
from rqml_dask.stores.lmdb_store import LMDBStore
from rqml_dask.task import CheckpointSettings, ConvergenceSettings

from test_node_unit import make_problem, make_task

FIXED = ConvergenceSettings(max_iterations=60, check_every=5, stability_tol=0, consistency_tol=0, novelty_window=10**6)


@pytest.fixture
def checkpointer(tmp_path):
    alerts = []
    c = Checkpointer(LMDBStore(tmp_path / "node.lmdb"), None, ArtifactStore(tmp_path / "artifacts"), "node-a",
                     on_alert=lambda kind, payload: alerts.append((kind, payload)))
    c.alerts = alerts
    yield c
    c.stop()


def task_with_checkpoints(tmp_path: Path, ladder=("richardson_lucy_accelerated",), **settings):
    settings.setdefault("every_seconds", None)  # iteration-driven only: deterministic
    checkpoint = CheckpointSettings(local=f"lmdb://{tmp_path}/node.lmdb", artifacts=str(tmp_path / "artifacts"), **settings)
    return make_task("cp/0", model_ladder=ladder, convergence=FIXED, checkpoint=checkpoint)


def run_with_checkpoints(task, checkpointer, stop_at: int) -> Refinement:
    """Refine to ``stop_at``, letting every due checkpoint be written before going on."""
    refinement = Refinement.start(task, make_problem(7), numpy_backend())
    while refinement.iteration < stop_at:
        refinement.step()
        if reason := refinement.checkpoint_due():
            checkpointer.submit(refinement.snapshot(reason))
            assert checkpointer.flush()
    return refinement


def test_resumed_refinement_continues_exactly_as_uninterrupted(tmp_path, checkpointer):
    task = task_with_checkpoints(tmp_path, every_iterations=10)
    run_with_checkpoints(task, checkpointer, stop_at=35)  # checkpoints at 10, 20, 30; "crash" at 35
    resume = checkpointer.latest(task)
    assert resume.checkpoint.iteration == 30 and resume.rejected == []
    assert set(resume.arrays) == {"estimate", "alpha", "previous", "change"}  # all of accelerated RL's state
    resumed = Refinement.resume(task, make_problem(7), numpy_backend(), resume.checkpoint, resume.arrays)
    resumed.run_to_end()
    uninterrupted = Refinement.start(task, make_problem(7), numpy_backend())
    uninterrupted.run_to_end()
    assert resumed.resumed_from == 30 and resumed.iteration == uninterrupted.iteration == 60
    np.testing.assert_array_equal(resumed.estimate, uninterrupted.estimate)
    assert [dataclasses.astuple(r) for r in resumed.runs] == [dataclasses.astuple(r) for r in uninterrupted.runs]


@pytest.mark.parametrize("score", ["deviance", "object"])
def test_a_resumed_refinement_under_the_held_out_rule_returns_what_an_uninterrupted_one_does(tmp_path, checkpointer, score):
    from rqml_dask.held_out import thin
    from rqml_dask.task import TaskInput

    settings = ConvergenceSettings(max_iterations=200, check_every=5, stability_tol=0, consistency_tol=0,
                                   novelty_window=10**6, held_out_fraction=0.2, held_out_patience=10, held_out_score=score)
    task = task_with_checkpoints(tmp_path, ladder=("richardson_lucy",), every_iterations=5)
    task = dataclasses.replace(task, convergence=settings, input=TaskInput(task.input.image, task.input.operator, counts_per_unit=50.0))

    def problem():  # a blurred 16^3 volume at 50 photons per unit
        import scipy.signal

        psf = make_problem(7)["psf"]
        rng = np.random.default_rng(7)
        blurred = np.clip(scipy.signal.fftconvolve(rng.random((16, 16, 16)) ** 4, psf, mode="same"), 0, None)
        observed = (rng.poisson(blurred * 50) / 50).astype(np.float32)
        train, held = thin(observed, 50.0, 0.2, seed=3)
        return {"observed": observed, "image": train, "held_out": held, "psf": psf}

    uninterrupted = Refinement.start(task, problem(), numpy_backend())
    uninterrupted.run_to_end()
    figures = uninterrupted.held_out_figures()
    assert uninterrupted.status == "converged" and figures.iteration < uninterrupted.iteration  # rolled back
    refinement = Refinement.start(task, problem(), numpy_backend())
    while refinement.iteration < figures.iteration + 5:  # a checkpoint past the best iterate, then a "crash"
        refinement.step()
        if reason := refinement.checkpoint_due():
            checkpointer.submit(refinement.snapshot(reason))
            assert checkpointer.flush()
    resume = checkpointer.latest(task)
    assert resume.checkpoint.iteration > figures.iteration and "held_out_best" in resume.arrays
    if score == "object":  # the guard's second choice is kept too
        assert resume.checkpoint.supervision_state["best_deviance"] is not None
    resumed = Refinement.resume(task, problem(), numpy_backend(), resume.checkpoint, resume.arrays)
    resumed.run_to_end()
    assert resumed.held_out_figures() == figures and resumed.iteration == uninterrupted.iteration
    assert uninterrupted.by_object_error == (score == "object") and resumed.best_deviance == uninterrupted.best_deviance
    np.testing.assert_array_equal(resumed.estimate, uninterrupted.estimate)


def test_a_refinement_resumed_between_two_held_out_checks_settles_where_an_uninterrupted_one_does(tmp_path, checkpointer):
    """Settling is judged on the held-out score's change since the previous check: a
    checkpoint taken between the two keeps that score, so a resumed task climbs the ladder
    at the same check as an uninterrupted one, not one check later."""
    from rqml_dask.held_out import thin
    from rqml_dask.task import TaskInput

    settings = ConvergenceSettings(max_iterations=40, check_every=5, stability_tol=1.0, consistency_tol=1.0,
                                   novelty_window=10**6, held_out_fraction=0.2, held_out_patience=100)
    task = task_with_checkpoints(tmp_path, ladder=("richardson_lucy", "richardson_lucy_accelerated"), every_iterations=5)
    task = dataclasses.replace(task, convergence=settings, input=TaskInput(task.input.image, task.input.operator, counts_per_unit=50.0))
    observed = make_problem(7)["image"]
    train, held = thin(np.clip(observed, 0, None), 50.0, 0.2, seed=3)

    def problem():
        return {"observed": observed, "image": train, "held_out": held, "psf": make_problem(7)["psf"]}

    uninterrupted = Refinement.start(task, problem(), numpy_backend())
    uninterrupted.run_to_end()
    assert [(r.model, r.iterations) for r in uninterrupted.runs][0] == ("richardson_lucy", 10)  # settled at its 2nd check
    refinement = Refinement.start(task, problem(), numpy_backend())
    while refinement.iteration < 7:  # a checkpoint at the first check (5), then a "crash"
        refinement.step()
        if reason := refinement.checkpoint_due():
            checkpointer.submit(refinement.snapshot(reason))
            assert checkpointer.flush()
    resume = checkpointer.latest(task)
    assert resume.checkpoint.iteration == 5
    resumed = Refinement.resume(task, problem(), numpy_backend(), resume.checkpoint, resume.arrays)
    resumed.run_to_end()
    assert [dataclasses.astuple(r) for r in resumed.runs] == [dataclasses.astuple(r) for r in uninterrupted.runs]
    np.testing.assert_array_equal(resumed.estimate, uninterrupted.estimate)


def test_a_final_checkpoint_resumes_finished_without_another_iteration(tmp_path, checkpointer):
    task = task_with_checkpoints(tmp_path, every_iterations=10)
    finished = Refinement.start(task, make_problem(7), numpy_backend())
    finished.run_to_end()
    checkpointer.submit(finished.snapshot("finished"))  # as a node parks a result in its outbox
    assert checkpointer.flush()
    resume = checkpointer.latest(task)
    resumed = Refinement.resume(task, make_problem(7), numpy_backend(), resume.checkpoint, resume.arrays)
    assert resumed.done and resumed.status == finished.status == "max_iterations"
    assert resumed.iteration == 60 and resumed.resumed_from == 60
    np.testing.assert_array_equal(resumed.estimate, finished.estimate)


def test_a_newer_snapshot_supersedes_a_queued_older_one(tmp_path, checkpointer):
    task = task_with_checkpoints(tmp_path, every_iterations=1)
    refinement = Refinement.start(task, make_problem(7), numpy_backend())
    with checkpointer._cond:  # hold the writer: every submit lands in the queue
        for _ in range(20):
            refinement.step()
            checkpointer.submit(refinement.snapshot("iterations"))
        assert len(checkpointer._queued) == 1
    assert checkpointer.flush()
    assert [e.iteration for e in checkpointer.local.checkpoints(task.key)] == [20]


def flip_byte_in_record(store: LMDBStore, key: str) -> None:
    with store.env.begin(write=True, db=store._slots) as txn:
        entries = decode_slot(txn.get(key.encode()))
        record = bytearray(entries[0].record)
        record[len(record) // 2] ^= 0xFF
        entries[0] = dataclasses.replace(entries[0], record=bytes(record))
        txn.put(key.encode(), encode_slot(entries))


def newest_artifact(store: LMDBStore, checkpointer: Checkpointer, key: str) -> Path:
    from rqml_dask.checkpoint import TaskCheckpoint

    record = TaskCheckpoint.from_msgpack(store.checkpoints(key)[0].record)
    return Path(record.artifact("estimate").location)


@pytest.mark.parametrize("damage", ["flip record byte", "truncate artifact", "flip artifact byte", "delete artifact"])
def test_damaged_newest_checkpoint_is_rejected_for_the_previous_valid_one(tmp_path, checkpointer, damage):
    task = task_with_checkpoints(tmp_path, every_iterations=10)
    run_with_checkpoints(task, checkpointer, stop_at=25)  # records at 20 (newest) and 10
    key = task.key
    if damage == "flip record byte":
        flip_byte_in_record(checkpointer.local, key)
    else:
        chunk = next(p for p in newest_artifact(checkpointer.local, checkpointer, key).rglob("*") if p.is_file() and p.name != "zarr.json")
        if damage == "truncate artifact":
            chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
        elif damage == "flip artifact byte":
            data = bytearray(chunk.read_bytes())
            data[100] ^= 0x01
            chunk.write_bytes(bytes(data))
        else:
            chunk.unlink()
    resume = checkpointer.latest(task)
    assert resume.checkpoint.iteration == 10
    assert len(resume.rejected) == 1 and "at iteration 20" in resume.rejected[0]
    assert [kind for kind, _ in checkpointer.alerts] == ["checkpoint-rejected"]
    assert checkpointer.alerts[0][1]["iteration"] == 20


def test_only_the_kept_records_artifacts_stay_on_disk_and_finish_cleans_up(tmp_path, checkpointer):
    task = task_with_checkpoints(tmp_path, every_iterations=5)
    run_with_checkpoints(task, checkpointer, stop_at=40)
    on_disk = sorted(int(p.name.split("-")[0]) for p in ArtifactStore(tmp_path / "artifacts").task_dir(task.key).iterdir())
    assert on_disk == [35, 40]  # the two kept records' sets; the six older ones were deleted
    assert checkpointer.state()[task.key]["last_checkpoint_iteration"] == 40
    checkpointer.finish(task, b'{"outcome": 1}')
    assert not ArtifactStore(tmp_path / "artifacts").task_dir(task.key).exists()
    assert checkpointer.local.checkpoints(task.key) == [] and checkpointer.outcome(task) == b'{"outcome": 1}'
    checkpointer.finish(task, b'{"outcome": 2}')
    assert checkpointer.outcome(task) == b'{"outcome": 1}'  # the first recorded outcome stays


class HeldLMDBStore(LMDBStore):
    """The real node store, whose checkpoint writes wait at their start until ``release``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writing, self.release = threading.Event(), threading.Event()

    def put_checkpoint(self, key, entry):
        self.writing.set()
        assert self.release.wait(10)
        return super().put_checkpoint(key, entry)


def test_a_task_finishing_while_its_snapshot_is_written_leaves_no_checkpoint_behind(tmp_path, caplog):
    """``retention: delete``, and the finish arrives while the writer writes the task's last
    snapshot (its artifacts are on disk, its record not yet in LMDB). Deleting under the
    writer left that record behind, pointing at deleted artifacts (or, when the deletion met
    Zarr mid-write, failed the write with a FileNotFoundError); the writer now deletes the
    finished task's checkpoints itself once its write is over, and finish does not wait."""
    local = HeldLMDBStore(tmp_path / "node.lmdb")
    artifacts = ArtifactStore(tmp_path / "artifacts")
    checkpointer = Checkpointer(local, None, artifacts, "node-a")
    try:
        task = task_with_checkpoints(tmp_path, every_iterations=5)
        refinement = Refinement.start(task, make_problem(7), numpy_backend())
        for _ in range(5):
            refinement.step()
        checkpointer.submit(refinement.snapshot("iterations"))
        assert local.writing.wait(10)  # the artifacts are written, the record is next
        assert artifacts.task_dir(task.key).exists()
        checkpointer.finish(task, b'{"outcome": 1}')
        assert not checkpointer.idle  # finish returned with the write still going
        local.release.set()
        assert checkpointer.flush() and checkpointer.idle
        assert local.checkpoints(task.key) == [] and checkpointer.state() == {}
        assert not artifacts.task_dir(task.key).exists()
        assert checkpointer.outcome(task) == b'{"outcome": 1}'
        assert "checkpoint writer failed" not in caplog.text
    finally:
        local.release.set()
        checkpointer.stop()


def test_model_switch_and_failed_validation_take_a_checkpoint(tmp_path, checkpointer):
    task = task_with_checkpoints(tmp_path, ladder=("richardson_lucy", "landweber"), every_iterations=1000)
    refinement = Refinement.start(task, make_problem(7), numpy_backend())
    for _ in range(3):
        refinement.step()
    assert refinement.checkpoint_due() is None
    refinement.escalate("test")
    assert refinement.checkpoint_due() == "model switch"
    checkpointer.submit(refinement.snapshot("model switch"))
    assert checkpointer.flush()
    resume = checkpointer.latest(task)
    assert resume.checkpoint.model_config.model == "landweber" and resume.checkpoint.iteration == 3


def test_with_a_time_interval_a_model_switch_adds_no_checkpoint_and_the_interval_still_comes(tmp_path, checkpointer):
    """``every_seconds`` bounds what a crash can lose: a switch within the interval (a cheap
    rung's quick stall) asks for no write of its own, and the interval's checkpoint comes
    as before, now of the new model."""
    task = task_with_checkpoints(tmp_path, ladder=("richardson_lucy", "landweber"), every_seconds=1.0)
    refinement = Refinement.start(task, make_problem(7), numpy_backend())
    for _ in range(3):
        refinement.step()
    refinement.escalate("test")
    assert refinement.model_name == "landweber" and refinement.checkpoint_due() is None
    time.sleep(1.05)
    assert refinement.checkpoint_due() == "interval"
    checkpointer.submit(refinement.snapshot("interval"))
    assert checkpointer.flush()
    resume = checkpointer.latest(task)
    assert resume.checkpoint.model_config.model == "landweber" and resume.checkpoint.iteration == 3
