"""What the RQML scheduler plugin keeps of each task and node, and its index of runs.

Sized for 10^5 tasks and 10^3 nodes: a task's record holds its traits, where it stands, its
latest supervision decisions (at most :data:`DECISIONS_KEPT`) and its convergence trace as
one small float32 array (at most :data:`LIVE_TRACE_POINTS` checks, thinned evenly as it
grows), about 3 KiB with a full trace (``bench/bench_scale.py``, BENCHMARKS.md); a node's
history of figures is a fixed ring of :data:`HISTORY_POINTS` float32 rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dask.typing import Key

from rqml_dask.messages import NodeHeartbeat, TaskProgress, TaskTraits, thin
from rqml_dask.scheduler.reliability import Reliability

LIVE_TRACE_POINTS = 64
"""At most this many convergence checks of a task are kept on the scheduler, for the live
pages (its outcome keeps :data:`~rqml_dask.messages.TRACE_POINTS`)."""
DECISIONS_KEPT = 16
"""A task record keeps its latest this many supervision decisions."""
HISTORY_POINTS = 600
"""Samples of each node's figures kept for the dashboard (one per ``rqml.scheduler.heartbeat-interval``)."""
FIGURES = ("misfit", "stability", "consistency", "novelty")
"""The convergence figures of a check, in :class:`~rqml_dask.messages.TracePoint`'s order."""
NODE_SERIES = ("iterations_per_second", "queued", "host_memory_fraction", "device_memory_fraction", "reliability")
"""The columns of a :class:`NodeHistory` (``queued``: inbound + refining)."""


@dataclass(slots=True)
class Trace:
    """A task's convergence checks as its nodes reported them, and its checkpoints.

    ``checks`` has one float32 row per check: iteration, model (an index into ``models``),
    then :data:`FIGURES` (NaN for a figure its model had not computed yet). At most
    :data:`LIVE_TRACE_POINTS` rows and checkpoints are kept, thinned evenly
    (:func:`~rqml_dask.messages.thin`), the latest always kept.
    """

    checks: np.ndarray = field(default_factory=lambda: np.empty((0, 2 + len(FIGURES)), np.float32))
    models: tuple[str, ...] = ()
    checkpoints: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))

    def add(self, progress: TaskProgress) -> None:
        """Take what a heartbeat reports: the checks and checkpoints after the latest ones kept."""
        last = self.checks[-1, 0] if len(self.checks) else -1.0
        new = [point for point in progress.trace if point[0] > last]
        if new:
            for model in {point[1] for point in new} - set(self.models):
                self.models += (model,)
            index = {model: i for i, model in enumerate(self.models)}
            rows = np.array([(i, index[m], a, b, c, d) for i, m, a, b, c, d in new], np.float32)  # None: NaN
            self.checks = thin(np.concatenate((self.checks, rows)), LIVE_TRACE_POINTS)
        last = self.checkpoints[-1] if len(self.checkpoints) else -1
        if checkpoints := [i for i in progress.checkpoints if i > last]:
            self.checkpoints = thin(np.concatenate((self.checkpoints, np.array(checkpoints, np.int32))), LIVE_TRACE_POINTS)

    @property
    def iterations(self) -> np.ndarray:
        return self.checks[:, 0]

    def figure(self, name: str) -> np.ndarray:
        """One of :data:`FIGURES` at every check kept (NaN: not computed)."""
        return self.checks[:, 2 + FIGURES.index(name)]

    def model_at(self) -> list[str]:
        """The model of every check kept."""
        return [self.models[int(i)] for i in self.checks[:, 1]]

    def latest(self) -> dict[str, float | None]:
        """:data:`FIGURES` of the latest check (``None``: not computed, or no check yet)."""
        if not len(self.checks):
            return dict.fromkeys(FIGURES)
        return {name: None if math.isnan(v) else float(v) for name, v in zip(FIGURES, self.checks[-1, 2:])}

    def switches(self) -> list[tuple[int, float, str]]:
        """``(iteration, misfit, model)`` of every check whose model differs from the check's before it."""
        models = self.checks[:, 1]
        return [(int(self.checks[i, 0]), float(self.checks[i, 2]), self.models[int(models[i])])
                for i in np.flatnonzero(models[1:] != models[:-1]) + 1]


@dataclass(slots=True)
class TaskRecord:
    """What the plugin knows of one RQML task, known by its task key (``traits.key``);
    ``dask_key`` is Dask's key of the submission it manages."""

    traits: TaskTraits
    dask_key: Key
    state: str = "pending"
    """pending, bound, done, erred; released: forgotten before it ended. Changed through
    :meth:`Runs.set_state`, which files the record by it."""
    worker: str | None = None
    attempts: int = 0
    avoid: frozenset[str] = frozenset()
    """Nodes it left (handed back, lost with its worker): passed over while another has room."""
    decisions: tuple[dict[str, Any], ...] = ()
    """Its latest :data:`DECISIONS_KEPT` supervision events, oldest first."""
    failed_here: bool = False
    model: str | None = None
    """The model the task runs now, as the node it is bound to reports it (its escalations
    and diversifications on the supervision topic); ``None``: the ladder's first."""
    iteration: int = 0
    """The iteration its node last reported (heartbeat ``progress``; changed through :meth:`Runs.set_iteration`)."""
    trace: Trace | None = None
    """Its convergence checks and checkpoints as its nodes reported them; ``None`` until the first report."""
    submitted_at: float = field(default_factory=time.time)
    result_state: str | None = None
    """The terminal state its node reported with the result (``rqml-task_results``), if any."""
    reused: bool = False
    """Its node reported the result as reused: recorded by an earlier run, nothing computed now
    (its iteration, model and trace are then that run's)."""
    verified_by: str | None = None
    """The node whose signed result for this submission (:attr:`dask_key`) last passed
    :class:`ResultCheck` (``pqtls://``): a result of it from another node is unproven."""

    def decided(self, event: dict[str, Any]) -> None:
        """Keep a supervision event of this task (the latest :data:`DECISIONS_KEPT`)."""
        self.decisions = (*self.decisions[1 - DECISIONS_KEPT:], event)

    @property
    def switched(self) -> bool:
        """Whether its node escalated or diversified it to a model other than its ladder's first."""
        return self.model is not None and self.model != self.traits.model


@dataclass(slots=True)
class NodeHistory:
    """A node's figures at each of the plugin's heartbeats, the latest :data:`HISTORY_POINTS`:
    a ring of sample times (Unix seconds) and float32 rows of :data:`NODE_SERIES` (NaN: not
    reported)."""

    times: np.ndarray = field(default_factory=lambda: np.zeros(HISTORY_POINTS))
    values: np.ndarray = field(default_factory=lambda: np.full((HISTORY_POINTS, len(NODE_SERIES)), np.nan, np.float32))
    count: int = 0
    """Samples taken so far (the latest :data:`HISTORY_POINTS` are kept)."""

    def append(self, when: float, values: tuple[float, ...]) -> None:
        at = self.count % HISTORY_POINTS
        self.times[at] = when
        self.values[at] = values
        self.count += 1

    def series(self) -> tuple[np.ndarray, np.ndarray]:
        """Times and rows of the samples kept, oldest first."""
        if self.count <= HISTORY_POINTS:
            return self.times[:self.count], self.values[:self.count]
        at = self.count % HISTORY_POINTS
        return np.roll(self.times, -at), np.roll(self.values, -at, axis=0)

    def latest(self, name: str) -> float | None:
        """The latest sample of the series ``name`` (``None``: none yet)."""
        if not self.count:
            return None
        value = float(self.values[(self.count - 1) % HISTORY_POINTS, NODE_SERIES.index(name)])
        return None if math.isnan(value) else value


@dataclass
class NodeRecord:
    """What the plugin knows of one node (a worker, by address)."""

    address: str
    reliability: Reliability
    bound: set[str] = field(default_factory=set)
    """Keys of the tasks bound to it and not ended."""
    completed: int = 0
    failed: int = 0
    figures: NodeHeartbeat = field(default_factory=NodeHeartbeat)
    """Its latest heartbeat figures that passed the check, less ``progress`` (taken into the tasks' records)."""
    invalid_figures: str | None = None
    """Why the node's latest heartbeat figures were refused (it rests meanwhile), or None."""
    history: NodeHistory = field(default_factory=NodeHistory)
    lost_votes: dict[tuple[str, float], int] = field(default_factory=dict)
    """Cross-node votes its results lost in a row, per streak: each run (pipeline name) and
    vote tolerance counts on its own, so a streak never carries over into a run with other
    data or another tolerance (``pqtls://``: voters are known by their certificates)."""
    won_votes: dict[tuple[str, float], int] = field(default_factory=dict)
    """Cross-node votes its results passed, per streak."""


@dataclass(slots=True)
class Run:
    """The task records of one pipeline run, by task key in order of submission; by state
    (each state's in the order they came to it); its tiles (records with a core, votes
    aside) by their layer along z (``(0, 0)`` for 2-D cores); its voters by the task id they
    vote on; and the sum of its tasks' iterations."""

    records: dict[str, TaskRecord] = field(default_factory=dict)
    by_state: dict[str, dict[str, TaskRecord]] = field(default_factory=dict)
    layers: dict[tuple[int, int], dict[str, TaskRecord]] = field(default_factory=dict)
    voters: dict[str, dict[str, TaskRecord]] = field(default_factory=dict)
    iterations: int = 0

    def counts(self) -> dict[str, int]:
        """How many of its tasks are in each state."""
        return {state: len(records) for state, records in self.by_state.items() if records}

    def refining_by_layer(self) -> dict[tuple[int, int], int]:
        """How many of its tiles refine now (bound, past their first iteration), by layer;
        only layers that have some. Reads its bound records only."""
        found: dict[tuple[int, int], int] = {}
        for record in self.by_state.get("bound", {}).values():
            if record.iteration > 0 and (group := self._group(record)) is not None and group[0] is self.layers:
                found[group[1]] = found.get(group[1], 0) + 1
        return found

    def _group(self, record: TaskRecord) -> tuple[dict[Any, dict[str, TaskRecord]], Any] | None:
        """Where ``record`` is filed besides ``records``: (``voters``, the task id it votes on),
        (``layers``, its layer) or ``None``."""
        task_id, core = record.traits.task_id, record.traits.core
        if "/vote-" in task_id:
            return self.voters, task_id.split("/vote-")[0]
        if core:
            return self.layers, tuple(core[0]) if len(core) == 3 else (0, 0)
        return None

    def add(self, record: TaskRecord) -> None:
        """File ``record``, in place of any earlier record of its task."""
        key = record.traits.key
        if (earlier := self.records.get(key)) is not None:
            self.discard(earlier)
        self.records[key] = record
        self.by_state.setdefault(record.state, {})[key] = record
        self.iterations += record.iteration
        if (group := self._group(record)) is not None:
            groups, name = group
            groups.setdefault(name, {})[key] = record

    def discard(self, record: TaskRecord) -> None:
        """Forget ``record`` unless another record of its task replaced it."""
        key = record.traits.key
        if self.records.get(key) is not record:
            return
        del self.records[key]
        del self.by_state[record.state][key]
        self.iterations -= record.iteration
        if (group := self._group(record)) is not None:
            groups, name = group
            members = groups.get(name, {})
            members.pop(key, None)
            if not members:
                groups.pop(name, None)


def run_name(traits: TaskTraits) -> str:
    """The run (pipeline name) a task belongs to: its task id up to the first ``/``."""
    return traits.task_id.split("/", 1)[0]


def run_name_of_key(key: str) -> str:
    """The run (pipeline name) of the task ``key`` (``task_id@fingerprint``)."""
    return key.split("/", 1)[0].split("@", 1)[0]


class Runs:
    """Every task record the plugin holds (current and kept finished), by run, runs in order
    of their latest submission: what ``rqml status`` and the live pages read, so that none of
    them sorts or groups every record on each call."""

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}

    def add(self, record: TaskRecord) -> None:
        """A record submitted now (replacing any earlier one of its task)."""
        name = run_name(record.traits)
        run = self._runs.pop(name, None) or Run()
        self._runs[name] = run  # latest submitted last
        run.add(record)

    def _run_of(self, record: TaskRecord) -> Run | None:
        """The run ``record`` is filed in (``None``: it is not, e.g. another record of its task replaced it)."""
        run = self._runs.get(run_name(record.traits))
        return run if run is not None and run.records.get(record.traits.key) is record else None

    def set_state(self, record: TaskRecord, state: str) -> None:
        """``record`` is in ``state`` now."""
        if (run := self._run_of(record)) is not None and state != record.state:
            del run.by_state[record.state][record.traits.key]
            run.by_state.setdefault(state, {})[record.traits.key] = record
        record.state = state

    def set_iteration(self, record: TaskRecord, iteration: int) -> None:
        """``record``'s task reached ``iteration``."""
        if (run := self._run_of(record)) is not None:
            run.iterations += iteration - record.iteration
        record.iteration = iteration

    def discard(self, record: TaskRecord) -> None:
        """A record the plugin no longer holds."""
        name = run_name(record.traits)
        run = self._runs.get(name)
        if run is not None:
            run.discard(record)
            if not run.records:
                del self._runs[name]

    def counts(self) -> dict[str, int]:
        """How many of all the records are in each state."""
        counts: dict[str, int] = {}
        for run in self._runs.values():
            for state, count in run.counts().items():
                counts[state] = counts.get(state, 0) + count
        return counts

    def get(self, name: str | None) -> Run | None:
        return self._runs.get(name) if name is not None else None

    def names(self) -> list[str]:
        """Run names, the latest submitted last."""
        return list(self._runs)

    def latest(self) -> str | None:
        return next(reversed(self._runs), None)

    def __len__(self) -> int:
        return sum(len(run.records) for run in self._runs.values())
