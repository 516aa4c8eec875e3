"""Cross-node voting: the voter tasks of a task, and the tally that accepts or rejects it.

A task whose validation names ``vote_models`` gets one voter per model: the same region
refined by that model alone, into its own output array, on another node than the one that
holds the result (the scheduler plugin binds it so), and its outcome carries its verdict (the
two cores compared on its node: :func:`rqml_dask.node.results.vote_on`). The client counts
the verdicts (:func:`tally_vote`) once it verified each of them.
"""

from __future__ import annotations

from dataclasses import replace

from rqml_dask.messages import TaskOutcome, terminal_state
from rqml_dask.task import ArrayRef, RQMLTask


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


NO_INDEPENDENT_VOTER = "no independent voter"


def tally_vote(task: RQMLTask, outcome: TaskOutcome, result_node: str, voters: list[tuple[TaskOutcome, str]]) -> TaskOutcome:
    """Count the voters' verdicts on ``outcome``, the result of ``task`` that ``result_node``
    delivered; ``voters`` are the voters' outcomes with the node that delivered each (the
    signer, on a cluster that signs). The client tallies (:meth:`~rqml_dask.pipeline.Pipeline.run`),
    after it verified every one of them. A voter that disagrees (its core differs from the
    result's by more than the tolerance), has no result, votes on another task, or ran on the
    result's own node (no independent voter: a node cannot vouch for itself) rejects the
    result, with a validation failure naming the voter and why."""
    tolerance = task.validation.vote_tolerance
    differences, failures = {}, []
    for voter_task, (voter, node) in zip(voter_tasks(task), voters):
        model, verdict = voter_task.model_ladder[0], voter.vote or {}
        differences[model] = difference = verdict.get("difference")
        if node == result_node:
            failures.append(f"vote: {model} ran on {node}, the node whose result it checks: {NO_INDEPENDENT_VOTER}")
        elif verdict.get("of") != task.key:
            failures.append(f"vote: {model} voted on {verdict.get('of')!r}, not on this task")
        elif difference is None:
            failures.append(f"vote: {model} has no result to compare ({voter.state})")
        elif difference > tolerance:
            failures.append(f"vote: {model} differs by {difference:.3g} > {tolerance:g}")
    vote = {"differences": differences, "tolerance": tolerance, "agreed": not failures, "voters": [node for _, node in voters]}
    failures = [*outcome.validation_failures, *failures]
    state = terminal_state(outcome.status, failures, task.convergence.accept_max_iterations)
    return replace(outcome, vote=vote, validation_failures=failures, state=state)
