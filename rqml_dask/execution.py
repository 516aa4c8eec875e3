"""Running one RQML task on a worker: read its window, refine, validate, write its core.

:func:`run_task` is what the Dask task that carries an RQML task executes. All iterations
run inside the worker, on its node's refinement thread; the scheduler sees one Dask task per
RQML task.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from distributed import Reschedule, rejoin, secede
from pydantic import TypeAdapter, ValidationError

from rqml_dask import events
from rqml_dask.arrays import ArrayBackend
from rqml_dask.convergence import ConvergenceFigures
from rqml_dask.held_out import HeldOutFigures, thin
from rqml_dask.refinement import ModelRun, Refinement
from rqml_dask.task import ArrayRef, RQMLTask
from rqml_dask.volumes import InputError, open_array, read_core, read_window, write_core

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rqml_dask.node.checkpointer import Checkpointer
    from rqml_dask.node.plugin import Job, NodePlugin


@dataclass(frozen=True)
class ErrorFigures:
    """Sums over a task's core against the ground truth, for a volume-wide relative RMSE."""

    output_sse: float
    input_sse: float
    truth_ss: float


TERMINAL_STATES = {
    "accepted": "nothing",
    "stalled": "add or change models of the ladder, or relax convergence.min_progress",
    "max_iterations": "raise convergence.max_iterations, or set convergence.accept_max_iterations",
    "terminated": "see the reason; the next run tries it again",
    "rejected": "see the validation failures",
    "failed": "fix the model; the next run tries it again",
}
"""Every task ends in one of these states, each with what to do about it. Only ``accepted``
(converged, or at ``max_iterations`` where the pipeline accepts that, and validated) counts:
``stalled`` (every model of the ladder and the policy's diversity stalled), ``max_iterations``
(not converged), ``terminated`` (a supervision decision, or the policy's max_task_seconds),
``rejected`` (failed validation, a cross-node vote included), ``failed`` (its model raised)."""


def terminal_state(status: str, validation_failures: list[str], accept_max_iterations: bool) -> str:
    """The :data:`TERMINAL_STATES` entry of a task that stopped with ``status``."""
    if status == "failed":
        return "failed"
    if validation_failures:
        return "rejected"
    if status == "converged" or (status == "max_iterations" and accept_max_iterations):
        return "accepted"
    return status


@dataclass
class TaskOutcome:
    """What a finished RQML task reports to whoever submitted it.

    ``state`` is its terminal state (:data:`TERMINAL_STATES`); ``status`` how its refinement
    stopped (``converged``, ``stalled``, ``max_iterations``, ``terminated``, ``failed``).

    ``node`` is the worker that refined it; ``vote`` the cross-node vote, if one ran;
    ``input_digest`` the content it was computed from (:func:`load_problem`);
    ``held_out`` what the held-out stopping rule saw (``None`` where it is off);
    ``written_to`` the array its core was written into and ``result_digest`` that core's
    digest (:func:`core_digest`; both ``None`` for a failed task, which has no result);
    ``resumed_from`` the checkpoint iteration the final run started from (``None``: from the
    start) and ``began_at`` when that run began (Unix seconds); ``reused`` says it was
    recorded before and nothing was recomputed; ``reconciled`` that it finished while its
    node had no scheduler and was accepted when the node reconnected; ``notes`` lists
    checkpoints rejected on the way.
    """

    task_id: str
    state: str
    status: str
    iterations: int
    model: str
    escalations: int
    models: list[ModelRun]
    convergence: ConvergenceFigures | None
    validation_failures: list[str]
    output: str
    elapsed_s: float
    backend: str
    error: ErrorFigures | None = None
    reason: str = ""
    node: str = ""
    vote: dict[str, Any] | None = None
    resumed_from: int | None = None
    reused: bool = False
    reconciled: bool = False
    began_at: float = 0.0
    input_digest: str | None = None
    held_out: HeldOutFigures | None = None
    written_to: ArrayRef | None = None
    result_digest: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.state == "accepted"


RESULT_FORMAT = b"rqml-result-3"
"""Part of every input digest: a release that computes or records results differently bumps
it, and no result or checkpoint of an older one is used."""


def load_problem(task: RQMLTask, backend: ArrayBackend) -> tuple[RQMLTask, dict]:
    """The task with its ``input_digest`` (of the image window and PSF as read, and
    :data:`RESULT_FORMAT`), and its problem on ``backend``, as float32: ``observed`` (the
    window), ``psf``, and ``image``, what the models refine: the window, or, with the
    held-out stopping rule, the part of its counts not held out (rescaled), the held-out
    counts being ``held_out`` (:func:`rqml_dask.held_out.thin`, seeded by the digest, so a
    task splits its data the same way on every node and every run)."""
    image = read_window(task.input.image, task.region)
    psf = np.asarray(open_array(task.input.psf)[...], dtype=np.float32)
    if psf.ndim != image.ndim:
        raise InputError(f"PSF {task.input.psf} has rank {psf.ndim}, image {task.input.image} has rank {image.ndim}")
    if not np.all(np.isfinite(psf)) or psf.sum() <= 0:
        raise InputError(f"PSF {task.input.psf} must be finite with a positive sum")
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


def copy_result(outcome: TaskOutcome, task: RQMLTask, source: ArrayRef) -> TaskOutcome:
    """Write the core ``source`` holds into ``task``'s output; ``outcome`` as written there."""
    write_core(task.output, task.region, read_core(source, task.region))
    return replace(outcome, output=f"{task.output}{task.region}", written_to=task.output)


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


def run_task(task: RQMLTask) -> TaskOutcome:
    """Run ``task`` on this worker's node, resuming from its newest valid checkpoint.

    A task whose outcome was recorded before (a re-run of the same pipeline, or a result
    settled when a degraded node reconnected) and whose core is in the output returns that
    outcome at once. A task the node already holds (it kept refining it without a scheduler)
    is joined, not started again. Otherwise the data is read on the Dask thread, which then
    secedes from the worker's pool while the node's refinement thread iterates, so the
    worker can hand the node more tasks.
    """
    from rqml_dask.node import current_node
    from rqml_dask.node.orchestrator import PushedBack

    node = current_node()
    checkpointer = node.checkpointer_for(task.checkpoint) if task.checkpoint else None
    task, problem = load_problem(task, node.orchestrator.backend)
    if (recorded := recorded_outcome(task, checkpointer)) is not None:
        return recorded
    job = node.claim(task)
    if job is None:
        resume = checkpointer.latest(task) if checkpointer is not None else None
        job = node.start_job(task, problem, checkpointer, resume)
        events.publish(node.worker, events.TASK_INBOUND, "queued", task_id=task.task_id, worker=node.worker.address,
                       resume_from=resume.checkpoint.iteration if resume is not None and resume.checkpoint else None)
    else:
        events.publish(node.worker, events.TASK_INBOUND, "joined", task_id=task.task_id, worker=node.worker.address)
    secede()
    try:
        refinement = node.wait(job)
    except PushedBack:
        raise Reschedule() from None
    finally:
        rejoin()
    if refinement.handed_back:  # rerouted: go on elsewhere from the checkpoint just taken
        if checkpointer is not None:
            checkpointer.flush()
        node.forget(job)
        raise Reschedule()
    outcome = deliver(node, job, refinement, job.outcome)
    if outcome.written_to is not None and outcome.written_to != task.output:  # joined a run writing elsewhere
        outcome = copy_result(outcome, task, outcome.written_to)
    return outcome


def recorded_outcome(task: RQMLTask, checkpointer: Checkpointer | None) -> TaskOutcome | None:
    """The outcome recorded for ``task`` (its done marker) if it was computed from the input
    the task has now (its ``input_digest``) and its result is in the task's output (the
    core's digest checked), or still where it was written, whence it is copied: the task is
    finished and nothing needs computing; else ``None``. A marker that does not decode
    (damaged, or of another release's format) is ignored, with an alert: the task is
    computed again."""
    recorded = checkpointer.outcome(task) if checkpointer is not None else None
    if recorded is None:
        return None
    try:
        outcome = OUTCOME.validate_json(recorded)
    except ValidationError as exc:
        reason = f"recorded outcome of {task.task_id} unreadable, computing it again: {exc.errors()[0]['msg']}"
        logger.warning(reason)
        checkpointer.on_alert("outcome-rejected", {"task_id": task.task_id, "reason": reason})
        return None
    if outcome.input_digest is None or outcome.input_digest != task.input_digest:
        logger.info("recorded outcome of %s was computed from other input data: computing it again", task.task_id)
        return None
    outcome = replace(outcome, reused=True)
    if holds_result(task.output, task, outcome.result_digest):
        return replace(outcome, output=f"{task.output}{task.region}", written_to=task.output)
    source = outcome.written_to
    if source is None or source == task.output or not holds_result(source, task, outcome.result_digest):
        return None  # the result is gone or was changed since: computed again
    return copy_result(replace(outcome, notes=[*outcome.notes, f"result copied from {source}"]), task, source)


def host_core(refinement: Refinement) -> np.ndarray:
    """The core of the refinement's estimate (what goes into the output), on the host."""
    return refinement.backend.to_numpy(refinement.estimate[refinement.task.region.core_in_window])


def outcome_of(job: Job, refinement: Refinement, node: str, core: np.ndarray | None) -> TaskOutcome:
    """The outcome of a finished, validated refinement whose host core is ``core`` (nothing
    is written); ``None`` for a failed one, which has no result."""
    task = refinement.task
    to_numpy = refinement.backend.to_numpy
    return TaskOutcome(
        task_id=task.task_id,
        state=terminal_state(refinement.status, refinement.validation_failures, task.convergence.accept_max_iterations),
        status=refinement.status,
        iterations=refinement.iteration,
        model=refinement.model_name,
        escalations=refinement.escalations,
        models=refinement.runs,
        convergence=refinement.last_figures,
        validation_failures=refinement.validation_failures,
        output=f"{task.output}{task.region}",
        elapsed_s=time.time() - job.began_at,
        backend=refinement.backend.name,
        error=None if core is None else error_figures(task, core, to_numpy(refinement.problem["observed"][task.region.core_in_window])),
        reason=refinement.reason,
        node=node,
        resumed_from=refinement.resumed_from,
        began_at=job.began_at,
        input_digest=task.input_digest,
        held_out=refinement.held_out_figures(),
        written_to=None if core is None else task.output,
        result_digest=None if core is None else core_digest(core),
        notes=list(job.resume.rejected) if job.resume is not None else [],
    )


def deliver(node: NodePlugin, job: Job, refinement: Refinement, outcome: TaskOutcome | None) -> TaskOutcome:
    """Write the task's core into the output, record its outcome (the done marker) and let
    the node forget the job. ``outcome`` is the job's parked one, if it was parked; else it
    is made here. If a result for the task was recorded and written first (by another
    node), that one stands: nothing is written and its outcome is returned. A failed task
    (its model raised) has no result: nothing is written or recorded, and the next run of
    the pipeline tries it again; a terminated one is written but not recorded, so the next
    run tries it again too (from its checkpoints)."""
    task = job.task
    if (recorded := recorded_outcome(task, job.checkpointer)) is not None:
        node.forget(job)
        return recorded
    if refinement.status == "failed":  # no result: nothing written or recorded, a new run tries again
        outcome = outcome or outcome_of(job, refinement, node.worker.address, None)
    else:
        core = host_core(refinement)
        if outcome is None:
            outcome = outcome_of(job, refinement, node.worker.address, core)
        write_core(task.output, task.region, core)
        if job.checkpointer is not None and outcome.state != "terminated":  # a terminated one: tried again
            job.checkpointer.finish(task, OUTCOME.dump_json(outcome))
    node.forget(job)
    events.publish(node.worker, events.TASK_RESULTS, "finished", task_id=task.task_id, worker=node.worker.address,
                   status=outcome.status, iterations=outcome.iterations, model=outcome.model,
                   escalations=outcome.escalations, resumed_from=outcome.resumed_from, reconciled=outcome.reconciled)
    return outcome


def voter_tasks(task: RQMLTask) -> list[RQMLTask]:
    """One task per vote model: the same region refined by that model alone, into its own
    output array (``ARRAY-vote-MODEL``)."""
    return [
        replace(
            task,
            task_id=f"{task.task_id}/vote-{model}",
            model_ladder=(model,),
            output=ArrayRef(task.output.store, vote_array(task.output.path, model)),
            validation=replace(task.validation, vote_models=()),
        )
        for model in task.validation.vote_models
    ]


def vote_array(array: str, model: str) -> str:
    return f"{array}-vote-" + "".join(c if c.isalnum() or c in "_-" else "_" for c in model)


def run_vote(voter: RQMLTask, result: TaskOutcome) -> TaskOutcome:
    """A voter's Dask task: it depends on the result it votes on, so it runs after it, and
    the scheduler plugin binds it away from the node holding that result."""
    return run_task(voter)


def tally_vote(task: RQMLTask, outcome: TaskOutcome, voters: list[TaskOutcome]) -> TaskOutcome:
    """Compare each voter's core with the result's; a disagreement beyond the tolerance
    rejects the result (a validation failure naming the voter and the difference)."""
    core = read_core(task.output, task.region, np.float64)
    norm = float(np.linalg.norm(core)) or 1.0
    differences = {}
    for voter_task, voter in zip(voter_tasks(task), voters):
        other = read_core(voter_task.output, task.region, np.float64)
        differences[voter_task.model_ladder[0]] = float(np.linalg.norm(other - core)) / norm
    tolerance = task.validation.vote_tolerance
    failures = [f"vote: {m} differs by {d:.3g} > {tolerance:g}" for m, d in differences.items() if d > tolerance]
    vote = {"differences": differences, "tolerance": tolerance, "agreed": not failures, "voters": [v.node for v in voters]}
    failures = [*outcome.validation_failures, *failures]
    state = terminal_state(outcome.status, failures, task.convergence.accept_max_iterations)
    return replace(outcome, vote=vote, validation_failures=failures, state=state)


OUTCOME = TypeAdapter(TaskOutcome)
