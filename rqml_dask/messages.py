"""The messages that cross between the client, the scheduler and the nodes.

Plain data, and the pydantic adapters that check them where they arrive: the supervision
policy a node enforces and the decisions it carries out (scheduler -> node), what routing
knows of a task (client -> scheduler, in the task's ``rqml`` annotation), the figures a node
advertises on every heartbeat and what a node back from degraded mode reports (node ->
scheduler), and a task's outcome (node -> client, and into the node's done marker). Both
sides import this module, never each other; it imports no Dask.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import numpy as np
from pydantic import ConfigDict, Field, StrictStr, TypeAdapter, ValidationError
from typing_extensions import Annotated

from rqml_dask.convergence import ConvergenceFigures
from rqml_dask.held_out import HeldOutFigures
from rqml_dask.task import ArrayRef

_STRICT = ConfigDict(extra="forbid", frozen=True)

# -- scheduler -> node ----------------------------------------------------------------------

MIN_TASK_SECONDS = 1.0
"""The smallest ``max_task_seconds`` a policy may set: below it every task would be ended at once."""
MAX_NAMES = 100
"""The most task classes (or models of one class) a policy may name in one field."""
_ClassName = Annotated[StrictStr, Field(min_length=1, max_length=100)]
_ModelName = Annotated[StrictStr, Field(min_length=1, max_length=200)]


@dataclass(frozen=True)
class NodePolicy:
    """How a node orders, runs and judges its RQML tasks.

    * ``class_order``: task classes in the order the inbound queue serves them (classes not
      listed come after, by name);
    * ``min_concurrency``/``max_concurrency``: bounds of the refinement queue's adaptive size
      (1 to 1024, the first at most the second);
    * ``on_validation_failure``: ``escalate`` refines a rejected result further with the next
      model of its ladder (and validates again), ``reject`` returns it as it is;
    * ``max_task_seconds``: a task refining longer is terminated with that reason (at least
      :data:`MIN_TASK_SECONDS`, at most 30 days; ``None``: no limit);
    * ``diversity``: per task class, models of other families to try, in order, when a task
      has stalled on every model of its ladder; a task that stalls on those too ends
      ``stalled`` with the reason;
    * ``gpu_classes``: task classes the scheduler places on GPU nodes only;
    * ``max_inbound``: a node holding more unstarted tasks (1 to 10,000) pushes the last
      ones in its order back to the scheduler, to be placed elsewhere.

    ``version`` and ``signature`` are the scheduler's: it numbers every policy it adopts,
    higher than any before it on the cluster, and on a ``pqtls://`` cluster signs it with its
    certificate (:mod:`rqml_dask.trust.policy`); a caller's values are ignored. Constructing
    one checks that the concurrency bounds are ordered; :func:`read_policy` checks the rest.
    """

    __pydantic_config__ = _STRICT

    version: Annotated[int, Field(ge=0)] = 0
    class_order: Annotated[tuple[_ClassName, ...], Field(max_length=MAX_NAMES)] = ("deconvolution",)
    min_concurrency: Annotated[int, Field(ge=1, le=1024)] = 1
    max_concurrency: Annotated[int, Field(ge=1, le=1024)] = 8
    on_validation_failure: Literal["escalate", "reject"] = "escalate"
    max_task_seconds: Annotated[float, Field(ge=MIN_TASK_SECONDS, le=30 * 86400, allow_inf_nan=False)] | None = None
    diversity: Annotated[dict[_ClassName, Annotated[tuple[_ModelName, ...], Field(max_length=MAX_NAMES)]],
                         Field(max_length=MAX_NAMES)] = field(default_factory=lambda: {"deconvolution": ("landweber",)})
    gpu_classes: Annotated[tuple[_ClassName, ...], Field(max_length=MAX_NAMES)] = ()
    max_inbound: Annotated[int, Field(ge=1, le=10_000)] = 4
    signature: dict[str, Any] | None = None
    """The scheduler's signature (``pqtls://``), in :class:`~rqml_dask.trust.signing.Verifier`'s format."""

    def __post_init__(self) -> None:
        if self.min_concurrency > self.max_concurrency:
            raise ValueError(f"min_concurrency: {self.min_concurrency} is above max_concurrency={self.max_concurrency}")

    def class_rank(self, task_class: str) -> int:
        try:
            return self.class_order.index(task_class)
        except ValueError:
            return len(self.class_order)

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves the old policy or the new one, never half of one."""
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(POLICY.dump_json(self))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Self | None:
        """The policy saved at ``path``; ``None`` if there is none or it is unreadable."""
        try:
            return POLICY.validate_json(path.read_bytes())
        except (OSError, ValidationError, json.JSONDecodeError):
            return None


POLICY = TypeAdapter(NodePolicy)
POLICY_OP = "rqml-policy"
"""The message on a worker's batched stream (scheduler -> node) that carries the policy:
``{"op": POLICY_OP, "policy": ...}``, sent when the node registers and on every change."""


class InvalidPolicy(ValueError):
    """A policy refused: a field of the wrong type or out of its bounds, or one that would
    leave no node able to run a task class. The message names the field."""


class NoCapableNode(RuntimeError):
    """A task failed by the scheduler: no node of the cluster can run its class under the
    policy (e.g. its class is in ``gpu_classes`` and no node has a GPU)."""


def read_policy(raw: Any) -> NodePolicy:
    """``raw`` (what a caller of ``rqml_policy`` sent) as a :class:`NodePolicy`; its
    ``version`` and ``signature`` are dropped (the scheduler sets them). Raises
    :class:`InvalidPolicy` naming the first bad field (``max_task_seconds: Input should be
    greater than or equal to 1 (got 0.5)``)."""
    if not isinstance(raw, dict):
        raise InvalidPolicy(f"policy: expected a mapping of policy fields, got {type(raw).__name__}")
    try:
        return POLICY.validate_python({k: v for k, v in raw.items() if k not in ("version", "signature")})
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "value_error" and not first["loc"]:  # __post_init__: its message names the field
            raise InvalidPolicy(str(first["ctx"]["error"])) from None
        where = ".".join(str(p) for p in first["loc"]) or "policy"
        got = repr(first.get("input"))
        raise InvalidPolicy(f"{where}: {first['msg']} (got {got if len(got) <= 80 else got[:77] + '...'})") from None


@dataclass(frozen=True)
class Decision:
    """A supervision decision for one task: ``escalate`` to the next model now,
    ``terminate`` it (it ends with status ``terminated`` and ``reason``), ``revalidate`` it
    (apply its validation rules to the current estimate now; a failure escalates under the
    policy's ``escalate`` rule), or ``reroute`` it: checkpoint it and hand it back to the
    scheduler, which binds it to another node where it resumes from that checkpoint."""

    __pydantic_config__ = _STRICT

    key: str
    """The task's key (:attr:`~rqml_dask.task.RQMLTask.key`)."""
    action: Literal["escalate", "terminate", "revalidate", "reroute"]
    reason: str = ""


DECISION = TypeAdapter(Decision)

# -- client -> scheduler ------------------------------------------------------------------


def task_name(key: str) -> str:
    """The task id a task key (``task_id@fingerprint``, :attr:`~rqml_dask.task.RQMLTask.key`)
    starts with: what people read; the key is what identifies the task."""
    return key.rpartition("@")[0] or key


def dask_key(task_key: str, submission: str) -> tuple[str, str, str]:
    """The Dask key of one submission of the task ``task_key``: ``("rqml", task_key,
    submission)``. ``submission`` is an unguessable token the client draws for each
    submission (:func:`new_submission`), so no other party can put data under the key
    before or instead of the node computing it; what a submission may reuse comes from the
    stores, by task key, never from a Dask key. A voter's key is of its own task key."""
    return ("rqml", task_key, submission)


def new_submission() -> str:
    """A fresh, unguessable submission token (128 bits)."""
    return secrets.token_hex(16)


def delivered_as(task_key: str, submission: str) -> str:
    """What a node signs an outcome it delivers for one submission over (with the outcome
    and the time, :func:`rqml_dask.trust.signing.outcome_message`): the task key and the
    submission, so a signed result answers that submission only. A done marker is signed
    over the bare task key: it cannot pass as a delivery, nor a delivery as another."""
    return f"{task_key}#{submission}"


@dataclass(frozen=True, slots=True)
class TaskTraits:
    """What routing needs to know of an RQML task (carried in its ``rqml`` annotation).
    ``key`` is the task's :attr:`~rqml_dask.task.RQMLTask.key`: the one identity by which the
    client, the scheduler plugin and the nodes know the task."""

    key: str
    task_class: str
    model: str
    priority: int = 0
    difficulty: float = 1.0
    wants_gpu: bool = False
    core: tuple[tuple[int, int], ...] = ()
    """The part of the volume the task owns (its region's core), for the dashboard's tile map."""

    @property
    def task_id(self) -> str:
        """The task's id, for display (:func:`task_name`)."""
        return task_name(self.key)


# -- node -> scheduler --------------------------------------------------------------------


@dataclass(frozen=True)
class TaskReport:
    """One task a node reports at reconciliation: how far it got, and whether it finished
    (its result waits in the node's outbox). On a ``pqtls://`` cluster a finished one
    carries that result, signed (:class:`TaskOutcome` as JSON), for the scheduler to check."""

    key: str
    iteration: Annotated[int, Field(ge=0)]
    finished: bool
    outcome: dict[str, Any] | None = None


TASK_REPORTS = TypeAdapter(list[TaskReport])


_HEARD = ConfigDict(extra="ignore", frozen=True)
"""Heartbeat figures: a node sends more than the scheduler reads; the rest is not kept."""
Count = Annotated[int, Field(ge=0, le=10**9, strict=True)]
Rate = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
MemoryFraction = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Figure = Annotated[float, Field(strict=False)] | None


@dataclass(frozen=True, slots=True)
class TaskProgress:
    """A refining task as its node reports it on a heartbeat: its iteration, its latest
    convergence checks (:class:`TracePoint` as tuples) and the iterations it was
    checkpointed at. Shown on the dashboard, never steered by."""

    __pydantic_config__ = _HEARD

    iteration: Count
    trace: Annotated[tuple[tuple[Count, Annotated[StrictStr, Field(max_length=200)], Figure, Figure, Figure, Figure], ...],
                     Field(max_length=1024)] = ()
    checkpoints: Annotated[tuple[Count, ...], Field(max_length=1024)] = ()


PROGRESS = TypeAdapter(TaskProgress)
"""Checks a task's progress as a node reports it on its own (the figures of a finished task's
``rqml-task_results`` event); a heartbeat's are checked with the heartbeat."""


@dataclass(frozen=True, slots=True)
class NodeLink:
    """A node's link to the scheduler as it reports it (its ``/health``): ``ok`` or
    ``degraded``, how often and how long it worked without a scheduler, the jobs and
    outbox it holds, and what reconciliation settled."""

    __pydantic_config__ = _HEARD

    status: StrictStr = "unknown"
    scheduler_losses: Count = 0
    degraded_seconds_total: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    jobs: Count = 0
    outbox: Count = 0
    reconciled: Count = 0
    discarded: Count = 0


@dataclass(frozen=True, slots=True)
class CheckpointBacklog:
    """A node's checkpoint writers: writes waiting, how far behind they are, writes done."""

    __pydantic_config__ = _HEARD

    pending: Count = 0
    lag_seconds: Annotated[float, Field(allow_inf_nan=False)] = 0.0
    written: Count = 0


@dataclass(frozen=True, slots=True)
class NodeHeartbeat:
    """The figures the scheduler steers by and shows, from a node's heartbeat (the custom
    worker metric ``rqml``, :meth:`rqml_dask.node.NodePlugin.heartbeat`), each of its type
    and a plausible range. Checked once, where the heartbeat arrives (:func:`read_heartbeat`);
    a node whose figures fail the check gets no new work while another node can take it.
    ``progress`` holds the tasks refining on the node, by task key."""

    __pydantic_config__ = _HEARD

    concurrency_limit: Annotated[int, Field(ge=1, le=10_000, strict=True)] = 1
    iterations_per_second: Rate = 0.0
    busy_fraction: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)] = 0.0
    inbound: Count = 0
    refining: Count = 0
    outbound: Count = 0
    gpu_count: Annotated[int, Field(ge=0, le=1024, strict=True)] = 0
    warm_models: tuple[StrictStr, ...] = ()
    policy_version: Annotated[int, Field(ge=0, strict=True)] = 0
    """The version of the policy the node enforces (:attr:`NodePolicy.version`)."""
    host_memory_fraction: MemoryFraction = 0.0
    device_memory_fraction: MemoryFraction | None = None
    checkpoints: CheckpointBacklog = CheckpointBacklog()
    link: NodeLink = NodeLink()
    progress: Annotated[dict[Annotated[str, Field(max_length=500)], TaskProgress], Field(max_length=100_000)] = \
        field(default_factory=dict)


HEARTBEAT = TypeAdapter(NodeHeartbeat)


class InvalidHeartbeat(ValueError):
    """A heartbeat figure of the wrong type or out of range."""


def read_heartbeat(raw: Any) -> NodeHeartbeat:
    """``raw`` (a node's ``rqml`` metric) as a :class:`NodeHeartbeat`; :class:`InvalidHeartbeat`
    naming the first bad field (``concurrency_limit: Input should be a valid integer (got
    'many')``) if it does not pass."""
    try:
        return HEARTBEAT.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "heartbeat"
        raise InvalidHeartbeat(f"{where}: {first['msg']} (got {first.get('input')!r})") from None


# -- node -> client -----------------------------------------------------------------------


@dataclass
class ModelRun:
    """One model's stint on a task: how many iterations, why it stopped, misfit at the end;
    ``strength`` where it was one candidate of a strength search (:mod:`rqml_dask.strength`)."""

    model: str
    iterations: int = 0
    stop: str = "running"
    misfit: float | None = None
    strength: float | None = None


Trace = TypeVar("Trace", list, np.ndarray)

TRACE_POINTS = 256
"""At most this many convergence checks are kept of a task in its outcome (thinned evenly
beyond it); the scheduler's live view keeps fewer
(:data:`~rqml_dask.scheduler.records.LIVE_TRACE_POINTS`)."""


def thin(trace: Trace, points: int = TRACE_POINTS) -> Trace:
    """``trace`` (a list, or an array along its first axis) kept within ``points``: every
    other point, the latest kept, as often as it takes."""
    while len(trace) > points:
        trace = np.concatenate((trace[:-1:2], trace[-1:])) if isinstance(trace, np.ndarray) else trace[:-1:2] + trace[-1:]
    return trace


@dataclass(frozen=True)
class TracePoint:
    """One convergence check of a task: at ``iteration`` (counted over the whole task, every
    model), ``model``'s misfit and the heuristics as :class:`~rqml_dask.convergence.ConvergenceFigures`
    has them (``None`` until that model's run has enough history)."""

    iteration: int
    model: str
    misfit: float
    stability: float
    consistency: float | None
    novelty: float | None


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
    "rejected": "the failures in brackets name each check the result failed, with its figures: fix what they name "
                "(the input data, the model ladder, or the pipeline's validation rules)",
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
    ``input_digest`` the content it was computed from (:func:`rqml_dask.problem.load_problem`);
    ``held_out`` what the held-out stopping rule saw (``None`` where it is off);
    ``written_to`` the array its core was written into and ``result_digest`` that core's
    digest (:func:`rqml_dask.problem.core_digest`; both ``None`` for a failed task, which has no result);
    ``resumed_from`` the checkpoint iteration the final run started from (``None``: from the
    start) and ``began_at`` when that run began (Unix seconds); ``reused`` says it was
    recorded before and nothing was recomputed; ``reconciled`` that it finished while its
    node had no scheduler and was accepted when the node reconnected; ``notes`` lists
    checkpoints rejected on the way; ``signature`` is the node's, over the rest, on a
    ``pqtls://`` cluster (:meth:`rqml_dask.trust.signing.Seal.sign_outcome`); ``trace`` holds
    every convergence check (:class:`TracePoint`), for the curves of ``rqml report``.
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
    signature: dict[str, Any] | None = None
    trace: list[TracePoint] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.state == "accepted"


OUTCOME = TypeAdapter(TaskOutcome)
