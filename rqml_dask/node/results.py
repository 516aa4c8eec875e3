"""A finished task's outcome on its node: made once, recorded as the done marker, reused.

:func:`outcome_of` is the one place a :class:`~rqml_dask.messages.TaskOutcome` is made from
a refinement; :func:`recorded_outcome` reads a done marker back and checks that the inputs
and the output still justify it; :func:`copy_result` moves a result written into another
pipeline's output into this one's; :func:`vote_on` is a voter's verdict on the result it
votes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
from pydantic import ValidationError

from rqml_dask.messages import OUTCOME, TaskOutcome, terminal_state
from rqml_dask.node.checkpointer import Checkpointer
from rqml_dask.problem import core_digest, error_figures, holds_result
from rqml_dask.refinement import Refinement
from rqml_dask.task import ArrayRef, RQMLTask
from rqml_dask.trust.signing import SignatureError
from rqml_dask.volumes import read_core, write_core

logger = logging.getLogger(__name__)


def host_core(refinement: Refinement) -> np.ndarray:
    """The core of the refinement's estimate (what goes into the output), on the host."""
    return refinement.backend.to_numpy(refinement.estimate[refinement.task.region.core_in_window])


def outcome_of(refinement: Refinement, node: str, core: np.ndarray | None, began_at: float, notes: list[str]) -> TaskOutcome:
    """The outcome of a finished, validated refinement whose host core is ``core`` (``None``
    for a failed one, which has no result); nothing is written. ``began_at`` is when the
    node took the task, ``notes`` the checkpoints it rejected on the way."""
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
        elapsed_s=time.time() - began_at,
        backend=refinement.backend.name,
        error=None if core is None else error_figures(task, core, to_numpy(refinement.problem["observed"][task.region.core_in_window])),
        reason=refinement.reason,
        node=node,
        resumed_from=refinement.resumed_from,
        began_at=began_at,
        input_digest=task.input_digest,
        held_out=refinement.held_out_figures(),
        written_to=None if core is None else task.output,
        result_digest=None if core is None else core_digest(core),
        notes=list(notes),
        trace=list(refinement.trace),
    )


def vote_on(voter: RQMLTask, outcome: TaskOutcome, result: TaskOutcome, of: str) -> TaskOutcome:
    """The voter's ``outcome`` with its verdict on ``result``, the result of task ``of`` (its
    key): ``vote`` = ``{"of", "model", "difference", "tolerance", "agreed"}``, ``difference``
    the relative L2 difference of the two cores (``None`` where either has no result, which
    does not agree)."""
    difference = None
    if outcome.written_to is not None and result.written_to is not None:
        core = read_core(result.written_to, voter.region, np.float64)
        mine = read_core(outcome.written_to, voter.region, np.float64)
        difference = float(np.linalg.norm(mine - core)) / (float(np.linalg.norm(core)) or 1.0)
    tolerance = voter.validation.vote_tolerance
    return replace(outcome, vote={"of": of, "model": voter.model_ladder[0], "difference": difference, "tolerance": tolerance,
                                  "agreed": difference is not None and difference <= tolerance})


def copy_result(outcome: TaskOutcome, task: RQMLTask, source: ArrayRef) -> TaskOutcome:
    """Write the core ``source`` holds into ``task``'s output; ``outcome`` as written there."""
    write_core(task.output, task.region, read_core(source, task.region))
    return replace(outcome, output=f"{task.output}{task.region}", written_to=task.output)


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
        if checkpointer.seal is not None:
            checkpointer.seal.verify_outcome(outcome, task.key)
    except (ValidationError, SignatureError) as exc:
        why, detail = ("unreadable", exc.errors()[0]["msg"]) if isinstance(exc, ValidationError) else ("refused", exc)
        reason = f"recorded outcome of {task.task_id} {why}, computing it again: {detail}"
        logger.warning(reason)
        checkpointer.on_alert("outcome-rejected", {"key": task.key, "task_id": task.task_id, "reason": reason})
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
