"""A task's problem as the models see it, and the digests that tie a result to its input.

:func:`load_problem` reads a task's window and PSF (checked by :func:`check_psf`, the same
check :meth:`rqml_dask.pipeline.Pipeline.tasks` applies before submitting), digests them
and splits the counts for the held-out stopping rule; :func:`core_digest` and
:func:`holds_result` say whether an output still holds a recorded result;
:func:`error_figures` scores a core against the ground truth. No Dask here.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

from rqml_dask.arrays import ArrayBackend
from rqml_dask.held_out import thin
from rqml_dask.messages import ErrorFigures
from rqml_dask.task import ArrayRef, RQMLTask
from rqml_dask.volumes import InputError, open_array, read_core, read_window

RESULT_FORMAT = b"rqml-result-3"
"""Part of every input digest: a release that computes or records results differently bumps
it, and no result or checkpoint of an older one is used."""


def check_psf(psf: np.ndarray, ref: ArrayRef, image_shape: tuple[int, ...], image_ref: ArrayRef) -> None:
    """Raise :class:`InputError` naming ``ref`` unless the PSF fits the image (same rank, no
    larger) and is finite, non-negative and has a positive sum."""
    if psf.ndim != len(image_shape):
        raise InputError(f"PSF {ref} has rank {psf.ndim} but image {image_ref} has rank {len(image_shape)}")
    if any(p > n for p, n in zip(psf.shape, image_shape)):
        raise InputError(f"PSF {ref} {psf.shape} is larger than image {image_ref} {tuple(image_shape)}")
    if not np.all(np.isfinite(psf)) or psf.sum() <= 0 or psf.min() < 0:
        raise InputError(f"PSF {ref} must be finite, non-negative and have a positive sum")


def load_problem(task: RQMLTask, backend: ArrayBackend) -> tuple[RQMLTask, dict]:
    """The task with its ``input_digest`` (of the image window and PSF as read, and
    :data:`RESULT_FORMAT`), and its problem on ``backend``, as float32: ``observed`` (the
    window), ``psf``, and ``image``, what the models refine: the window, or, with the
    held-out stopping rule, the part of its counts not held out (rescaled), the held-out
    counts being ``held_out`` (:func:`rqml_dask.held_out.thin`, seeded by the digest, so a
    task splits its data the same way on every node and every run)."""
    image = read_window(task.input.image, task.region)
    psf = np.asarray(open_array(task.input.psf)[...], dtype=np.float32)
    check_psf(psf, task.input.psf, open_array(task.input.image).shape, task.input.image)
    digest = hashlib.blake2b(RESULT_FORMAT, digest_size=16)
    for array in (image, psf):
        digest.update(repr((array.shape, array.dtype.str)).encode())
        digest.update(np.ascontiguousarray(array).data)
    task = replace(task, input_digest=digest.hexdigest())
    observed = backend.asarray(image)
    problem = {"observed": observed, "image": observed, "psf": backend.asarray(psf)}
    fraction, counts_per_unit = task.convergence.held_out_fraction, task.input.counts_per_unit
    if fraction > 0 and counts_per_unit is not None:
        train, held = thin(image, counts_per_unit, fraction, seed=int(task.input_digest[:16], 16))
        problem["image"], problem["held_out"] = backend.asarray(train), backend.asarray(held)
    return task, problem


def core_digest(core: np.ndarray) -> str:
    """The digest of a result core as the output holds it (float32)."""
    core = np.ascontiguousarray(core, dtype=np.float32)
    return hashlib.blake2b(repr(core.shape).encode() + core.data, digest_size=16).hexdigest()


def holds_result(ref: ArrayRef, task: RQMLTask, digest: str | None) -> bool:
    """Whether ``ref`` holds, at ``task``'s core, the result whose digest is ``digest``."""
    if digest is None:
        return False
    try:
        return core_digest(read_core(ref, task.region)) == digest
    except InputError:  # the array is gone or is not one
        return False


def error_figures(task: RQMLTask, core: np.ndarray, observed: np.ndarray) -> ErrorFigures | None:
    """The task's sums against the ground truth (read here), if the input has one."""
    if task.input.truth is None:
        return None
    truth = read_core(task.input.truth, task.region, np.float64)
    observed = observed.astype(np.float64)
    return ErrorFigures(
        output_sse=float(np.sum((core.astype(np.float64) - truth) ** 2)),
        input_sse=float(np.sum((observed - truth) ** 2)),
        truth_ss=float(np.sum(truth**2)),
    )
