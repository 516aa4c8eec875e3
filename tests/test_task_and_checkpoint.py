"""RQMLTask and TaskCheckpoint: round trips, hash verification, and refused bad messages."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError

from rqml_dask.checkpoint import ArtifactRef, CheckpointError, ModelConfig, TaskCheckpoint
from rqml_dask.task import ArrayRef, ConvergenceSettings, Region, RQMLTask, TaskInput


def make_task() -> RQMLTask:
    return RQMLTask(
        task_id="p/03",
        task_class="deconvolution",
        region=Region(core=((0, 8), (8, 16)), window=((0, 12), (4, 20))),
        input=TaskInput(ArrayRef("/data/in.zarr", "observed"), ArrayRef("/data/in.zarr", "psf")),
        output=ArrayRef("/data/out.zarr", "deconvolved"),
        model_ladder=("richardson_lucy", "richardson_lucy_tv"),
        model_params={"richardson_lucy_tv": {"regularization": 0.01}},
        priority=3,
        expected_difficulty=2.5,
        convergence=ConvergenceSettings(max_iterations=50, stability_tol=1e-4),
    )


def make_checkpoint(estimate: np.ndarray) -> TaskCheckpoint:
    ref = ArtifactRef("estimate", "/ckpt.zarr::p/03/estimate", estimate.shape, str(estimate.dtype), ArtifactRef.digest_of(estimate))
    return TaskCheckpoint.create("p/03", 40, ModelConfig("richardson_lucy", 0, {}), (ref,), {"escalations": 0, "status": "running"})


def test_task_round_trips_through_msgpack_and_json():
    task = make_task()
    assert RQMLTask.from_msgpack(task.to_msgpack()) == task
    assert RQMLTask.from_json(task.to_json()) == task
    assert task.region.core_in_window == (slice(0, 8), slice(4, 12))


def test_malformed_task_message_names_the_field():
    data = make_task().to_dict()
    data["convergence"]["max_iterations"] = "many"
    with pytest.raises(ValidationError, match=r"convergence\.max_iterations"):
        RQMLTask.from_msgpack(msgpack.packb(data))
    data = make_task().to_dict()
    data["region"]["extra"] = 1
    with pytest.raises(ValidationError, match=r"region\.extra"):
        RQMLTask.from_dict(data)


def test_checkpoint_round_trips_and_verifies():
    estimate = np.arange(12, dtype=np.float32).reshape(3, 4)
    checkpoint = make_checkpoint(estimate)
    assert TaskCheckpoint.from_msgpack(checkpoint.to_msgpack()) == checkpoint
    assert TaskCheckpoint.from_json(checkpoint.to_json()) == checkpoint
    checkpoint.artifact("estimate").check(estimate)
    assert [f.name for f in dataclasses.fields(TaskCheckpoint)] == [  # the seed's record, and who signed it
        "task_id", "iteration", "model_config", "intermediate_artifacts", "supervision_state", "hash", "signature",
    ]
    signed = dataclasses.replace(checkpoint, signature={"signer": "node-a"})
    assert signed.compute_hash() == checkpoint.hash and signed.verify() is signed  # the signature is outside the hash


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d.update(iteration=41),
        lambda d: d["supervision_state"].update(escalations=1),
        lambda d: d["intermediate_artifacts"][0].update(digest="0" * 64),
        lambda d: d["model_config"].update(model="landweber"),
    ],
)
def test_tampered_checkpoint_is_rejected(tamper):
    data = make_checkpoint(np.ones((2, 2), np.float32)).to_dict()
    tamper(data)
    with pytest.raises(CheckpointError, match="hash mismatch"):
        TaskCheckpoint.from_msgpack(msgpack.packb(data))


def test_torn_checkpoint_and_damaged_artifact_are_rejected():
    estimate = np.ones((2, 2), np.float32)
    payload = make_checkpoint(estimate).to_msgpack()
    with pytest.raises(CheckpointError, match="undecodable"):
        TaskCheckpoint.from_msgpack(payload[: len(payload) // 2])
    damaged = estimate.copy()
    damaged[0, 0] = 2
    with pytest.raises(CheckpointError, match="digest mismatch"):
        make_checkpoint(estimate).artifact("estimate").check(damaged)
    with pytest.raises(CheckpointError, match="expected float32"):
        make_checkpoint(estimate).artifact("estimate").check(estimate.astype(np.float64))
