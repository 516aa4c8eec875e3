"""Cross-node voting: the voter tasks of a task, and the tally that accepts or rejects it.

A task whose validation names ``vote_models`` gets one voter per model: the same region
refined by that model alone, into its own output array, on another node than the one that
holds the result (the scheduler plugin binds it so). :func:`tally_vote` compares the cores.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from rqml_dask.messages import TaskOutcome, terminal_state
from rqml_dask.task import ArrayRef, RQMLTask
from rqml_dask.volumes import read_core


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
    """The output array of ``model``'s voters beside ``array``."""
    return f"{array}-vote-" + "".join(c if c.isalnum() or c in "_-" else "_" for c in model)


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
