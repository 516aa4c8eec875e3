"""The Dask task functions of RQML tasks: each hands its task to this worker's node.

What the scheduler sees of an RQML task is one Dask task running :func:`run_task` (or
:func:`run_vote` for a voter); everything else (claim, resume, refine, checkpoint,
validate, deliver) is the node's (:meth:`rqml_dask.node.plugin.NodePlugin.run`).
"""

from __future__ import annotations

from rqml_dask.messages import TaskOutcome
from rqml_dask.node.plugin import current_node
from rqml_dask.task import RQMLTask


def run_task(task: RQMLTask, submission: str) -> TaskOutcome:
    """Give ``task`` to this worker's node and return its outcome, signed for the client's
    ``submission`` where the cluster signs, when the node is done."""
    return current_node().run(task, submission)


def run_vote(voter: RQMLTask, submission: str, result: TaskOutcome, of: str) -> TaskOutcome:
    """A voter's Dask task: it depends on ``result`` (of the task whose key is ``of``), so it
    runs after it, and the scheduler plugin binds it away from the node holding that result.
    Its outcome carries its verdict on the result (:func:`rqml_dask.node.results.vote_on`)."""
    return current_node().run(voter, submission, judging=(result, of))
