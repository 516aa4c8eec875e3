"""A task's problem as the models see it, and the digests that tie a result to its input.

:func:`read_input` reads a task's window and its operator (checked by
:func:`read_operator`, the same check :meth:`rqml_dask.pipeline.Pipeline.tasks` applies
before submitting) and digests them; :func:`load_problem` also splits the counts for the
held-out stopping rule;
:func:`core_digest` and :func:`holds_result` say whether an output still holds a recorded
result; :func:`error_figures` scores a core against the ground truth. No Dask here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from rqml_dask.arrays import ArrayBackend
from rqml_dask.held_out import thin
from rqml_dask.messages import ErrorFigures
from rqml_dask.models import TaskClass, load_task_class
from rqml_dask.task import ArrayRef, Region, RQMLTask
from rqml_dask.volumes import InputError, open_array, read_core, read_window

RESULT_FORMAT = b"rqml-result-7"
"""Part of every input digest: a release that computes or records results differently bumps
it, and no result or checkpoint of an older one is used."""

SPLIT_SALT = b"rqml-result-4"
"""Salts the digest of a window's data that seeds its held-out split: it stays when
:data:`RESULT_FORMAT` moves, so a task splits its counts the same way in every release
(a release that only rounds differently does not redraw every task's noise)."""


def read_operator(kind: TaskClass, ref: ArrayRef, core: Region | None, image_ref: ArrayRef) -> np.ndarray:
    """The operator at ``ref`` for a task of class ``kind`` whose core is ``core`` (``None``:
    only check it, reading what the class reads for a core of the first index along the
    first axis, whole along the others), checked against the image at ``image_ref``;
    :class:`InputError` naming both if it does not fit."""
    operator, image_shape = open_array(ref), tuple(open_array(image_ref).shape)
    box = core.core if core is not None else ((0, min(1, image_shape[0])), *((0, n) for n in image_shape[1:]))
    try:
        return kind.read_operator(operator, box, image_shape)
    except ValueError as exc:
        raise InputError(f"{kind.name} operator {ref} {tuple(operator.shape)} does not fit image {image_ref} "
                         f"{image_shape}: {exc}") from None


@dataclass(frozen=True)
class TaskInputData:
    """What a task reads of its input, its values checked: ``image`` (the window, in
    photons for camera data) and ``operator``, and ``digest``, the BLAKE2b of both that
    seeds the held-out split (:data:`SPLIT_SALT`); the task with its ``input_digest``."""

    task: RQMLTask
    image: np.ndarray
    operator: np.ndarray
    digest: str


def read_input(task: RQMLTask) -> TaskInputData:
    """Read and check ``task``'s window and operator, in the task class's dtype, and digest
    them: ``input_digest`` (of both and :data:`RESULT_FORMAT`) is what a recorded result or
    a checkpoint of the task must match to be used (:func:`load_problem` is this, and the
    problem built from it)."""
    kind = load_task_class(task.task_class)
    image = read_window(task.input.image, task.region, np.dtype(kind.dtype), nonnegative=kind.photon_counts,
                        accept_saturated=task.input.accept_saturated)
    image = image if task.input.camera is None else task.input.camera.photons(image, image.dtype)  # ADU to photons
    operator = read_operator(kind, task.input.operator, task.region, task.input.image)
    data = hashlib.blake2b(SPLIT_SALT, digest_size=16)
    for array in (image, operator):
        data.update(repr((array.shape, array.dtype.str)).encode())
        data.update(np.ascontiguousarray(array).data)
    task = replace(task, input_digest=hashlib.blake2b(RESULT_FORMAT + data.digest(), digest_size=16).hexdigest())
    return TaskInputData(task, image, operator, data.hexdigest())


def load_problem(task: RQMLTask, backend: ArrayBackend) -> tuple[RQMLTask, dict]:
    """The task with its ``input_digest`` (:func:`read_input`), and its problem on
    ``backend``, in the task class's dtype: ``observed`` (the window), the operator under
    the class's ``operator_key``, and ``image``, what the models refine against: the
    window, or, with the held-out stopping rule, the part of its counts not held out
    (rescaled), the held-out counts being ``held_out`` (:func:`rqml_dask.held_out.thin`,
    seeded by the data's digest, so a task splits its data the same way on every node,
    every run and every release: :data:`SPLIT_SALT`). Camera data (``task.input.camera``)
    are read as shifted-Poisson counts, and ``background`` (a float, in the image's units)
    is the pedestal the models add to their prediction (:class:`rqml_dask.camera.Camera`)."""
    read = read_input(task)
    task, image = read.task, read.image
    observed = backend.asarray(image)
    problem = {"observed": observed, "image": observed, load_task_class(task.task_class).operator_key: backend.asarray(read.operator)}
    if task.input.camera is not None:
        problem["background"] = task.input.camera.pedestal
    fraction, counts_per_unit = task.convergence.held_out_fraction, task.input.counts_per_unit
    if fraction > 0 and counts_per_unit is not None:
        train, held = thin(image, counts_per_unit, fraction, seed=int(read.digest[:16], 16))
        problem["image"], problem["held_out"] = backend.asarray(train), backend.asarray(held)
    return task, problem


def core_digest(core: np.ndarray) -> str:
    """The digest of a result core as the output holds it (in its own dtype)."""
    core = np.ascontiguousarray(core)
    return hashlib.blake2b(repr(core.shape).encode() + core.data, digest_size=16).hexdigest()


def holds_result(ref: ArrayRef, task: RQMLTask, digest: str | None) -> bool:
    """Whether ``ref`` holds, at ``task``'s core, the result whose digest is ``digest``."""
    if digest is None:
        return False
    try:
        return core_digest(read_core(ref, task.region, dtype=None)) == digest
    except InputError:  # the array is gone or is not one
        return False


def error_figures(task: RQMLTask, core: np.ndarray, observed: np.ndarray) -> ErrorFigures | None:
    """The task's sums against the ground truth (read here), if the input has one; the
    input's is that of the data where they estimate the result, else of a zero start."""
    if task.input.truth is None:
        return None
    truth = read_core(task.input.truth, task.region, np.float64)
    if load_task_class(task.task_class).data_is_estimate:  # less a camera's pedestal, which is no signal
        observed = observed.astype(np.float64) - (task.input.camera.pedestal if task.input.camera is not None else 0.0)
    else:
        observed = np.zeros_like(truth)
    return ErrorFigures(
        output_sse=float(np.sum((core.astype(np.float64) - truth) ** 2)),
        input_sse=float(np.sum((observed - truth) ** 2)),
        truth_ss=float(np.sum(truth**2)),
    )
