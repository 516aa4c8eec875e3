"""RQMLTask: one region of a large array, refined by a ladder of models until it converges.

Tasks are plain frozen dataclasses. They travel inside Dask tasks (pickled), and as msgpack or
JSON (:meth:`RQMLTask.to_msgpack`, :meth:`RQMLTask.from_json`...) to stores, events and other
nodes; decoding validates every field, so a malformed message is refused with the field path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import functools
import hashlib
from typing import Any, Literal, Self

import msgpack
from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import Annotated

from rqml_dask.camera import Camera
from rqml_dask.names import check_task_id

_STRICT = ConfigDict(extra="forbid", frozen=True)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


@dataclass(frozen=True)
class ConvergenceSettings:
    """When refinement stops. Every figure is relative and dimensionless.

    * stability: the estimate's relative change over one iteration is at most ``stability_tol``;
    * consistency: the data misfit, recomputed by the model apart from its iterations and
      summed in float64, changes by at most ``consistency_tol`` per iteration;
    * novelty: over the last ``novelty_window`` iterations the misfit improved by at least
      ``min_progress``; less is a *stall*, which escalates to the next model of the ladder.

    With ``held_out_fraction`` > 0 (photon-count data, :mod:`rqml_dask.held_out`), that
    fraction of the counts is held out and scores every checked iterate (``held_out_score``):
    consistency is then the score's relative change per iteration (with stability, it moves
    a task on to the next model of its ladder where that is a faster one, and never stops
    it), and a task converges only once the score has not improved for
    ``held_out_patience`` iterations (settling iterates stopped high-count data far before
    their optimum); its result is the iterate where it was lowest. ``held_out_score`` is
    ``deviance`` (the default: the held-out Poisson deviance of the prediction, the best
    prediction of the data) or ``object`` (the held-out *object* error,
    :meth:`~rqml_dask.held_out.HeldOutScore.object_error`, which ranks estimates as their
    error against the object does, later than the deviance's optimum; for a ladder whose
    every model has ``object_weights()``, else the deviance; on tiles whose core is smaller
    than the PSF it did worse: BENCHMARKS, "Choosing the iterate by its object error"). ``0`` refines the whole image and stops by the iterates alone (for fixed-budget
    runs, or data that are not photon counts). With ``refit_all_counts`` (the default), a
    result that passes the guard is then computed again on all the counts, along the same
    models and iteration counts that led to the chosen iterate: the held-out counts chose
    the stopping point, and are data too.

    With ``target_misfit`` set (a solver's requested tolerance, where the misfit is the true
    residual), consistency is the misfit itself, and holds once it is at most the target;
    with ``max_iterations_per_model`` too, a model (not the ladder's last) whose misfit,
    falling on at its rate over the novelty window, would reach the target only past that
    budget is a stall as well (the ladder moves on at once rather than after spending the
    budget).

    A task converges when stability and consistency both hold. The heuristics are evaluated
    every ``check_every`` iterations (each check costs a float64 misfit and one state copy).
    ``max_iterations`` bounds the whole task, ``max_iterations_per_model`` each model on the ladder.
    A task that reaches ``max_iterations`` without converging is not accepted unless
    ``accept_max_iterations`` is true (for fixed-iteration runs, where the count is the rule).
    """

    __pydantic_config__ = _STRICT

    max_iterations: PositiveInt = 200
    max_iterations_per_model: PositiveInt | None = None
    check_every: PositiveInt = 10
    stability_tol: NonNegativeFloat = 1e-3
    consistency_tol: NonNegativeFloat = 1e-3
    novelty_window: PositiveInt = 20
    min_progress: NonNegativeFloat = 1e-3
    accept_max_iterations: bool = False
    held_out_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    held_out_patience: PositiveInt = 15
    held_out_score: Literal["deviance", "object"] = "deviance"
    refit_all_counts: bool = True
    target_misfit: NonNegativeFloat | None = None


@dataclass(frozen=True)
class ValidationSettings:
    """What a finished estimate must satisfy to be accepted.

    ``vote_models``: cross-node voting. Each of these models (other families, for
    diversity) refines the same task again, on a node other than the one holding the result,
    and the result is accepted only if every voter's core is within ``vote_tolerance`` of it
    (relative L2 difference).
    """

    __pydantic_config__ = _STRICT

    require_finite: bool = True
    require_nonnegative: bool = True
    max_misfit: NonNegativeFloat | None = None
    vote_models: tuple[str, ...] = ()
    vote_tolerance: NonNegativeFloat = 0.1


@dataclass(frozen=True)
class CheckpointSettings:
    """When and where a task's checkpoints go.

    A checkpoint is taken every ``every_iterations`` iterations and/or every ``every_seconds``
    seconds, on a failed validation, and on a model switch where ``every_seconds`` is not
    set (with it, the interval bounds what a crash can lose; unless ``enabled`` is false).
    ``local`` is the node's LMDB (``lmdb://PATH``; ``{host}`` in it becomes the
    node's host name), ``shared`` an optional ``etcd://HOST:PORT`` or ``consul://HOST:PORT``,
    ``artifacts`` the directory every node can reach where the arrays go. ``retention``:
    ``delete`` removes a finished task's checkpoints and artifacts, ``keep`` leaves them.
    """

    __pydantic_config__ = _STRICT

    local: str
    artifacts: str
    shared: str | None = None
    enabled: bool = True
    every_iterations: PositiveInt | None = None
    every_seconds: Annotated[float, Field(gt=0)] | None = 5.0
    retention: Literal["delete", "keep"] = "delete"


@dataclass(frozen=True)
class Region:
    """The part of the volume a task owns (``core``) and the larger ``window`` it reads.

    Both are ``(start, stop)`` per axis in volume coordinates; ``window`` contains ``core``
    and extends it by the halo, up to the volume's border.
    """

    __pydantic_config__ = _STRICT

    core: tuple[tuple[int, int], ...]
    window: tuple[tuple[int, int], ...]

    @property
    def core_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.core)

    @property
    def window_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.window)

    @property
    def core_in_window(self) -> tuple[slice, ...]:
        """Where the core lies inside an array holding the window."""
        return tuple(slice(c0 - w0, c1 - w0) for (c0, c1), (w0, _) in zip(self.core, self.window))

    def __str__(self) -> str:
        return "[" + ", ".join(f"{a}:{b}" for a, b in self.core) + "]"


@dataclass(frozen=True)
class ArrayRef:
    """An array in a Zarr store: ``store`` is a local path (or URL zarr understands)."""

    __pydantic_config__ = _STRICT

    store: str
    path: str

    def __str__(self) -> str:
        return f"{self.store}::{self.path}"


@dataclass(frozen=True)
class TaskInput:
    """Where a task reads its data: ``image``, the array it refines against (an image, a
    right-hand side), and ``operator``, read with it (a PSF, a coefficient field: what the
    task class makes of it, :class:`rqml_dask.models.TaskClass`); ``truth`` is optional
    (synthetic data). ``counts_per_unit``: photons per unit of the image's intensity (what
    the held-out stopping rule thins), ``None`` where the image is not photon counts.
    ``camera``: the image is camera data in ADU, read as photon counts
    (:meth:`rqml_dask.camera.Camera.photons`), so the models and the result are in photons."""

    __pydantic_config__ = _STRICT

    image: ArrayRef
    operator: ArrayRef
    truth: ArrayRef | None = None
    counts_per_unit: Annotated[float, Field(gt=0)] | None = None
    accept_saturated: bool = False
    """Take an integer image's values at the type's maximum as they are, instead of refusing
    the window (:func:`rqml_dask.volumes.check_values`)."""
    camera: Camera | None = None


@dataclass(frozen=True)
class RQMLTask:
    """One unit of refinement work.

    ``model_ladder`` lists model names from smallest to largest; a stall escalates to the
    next one, keeping the current estimate. ``model_params`` maps a model name to the
    keyword arguments it is built with. ``priority`` (higher first) and
    ``expected_difficulty`` order a node's inbound queue. ``plugin_digest`` is the digest of
    the model files the pipeline ships with it (``plugins:``), so that changed model code
    never reuses what the old code computed.
    """

    __pydantic_config__ = _STRICT

    task_id: str
    task_class: str
    region: Region
    input: TaskInput
    output: ArrayRef
    model_ladder: tuple[str, ...]
    model_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    priority: int = 0
    expected_difficulty: float = 1.0
    convergence: ConvergenceSettings = ConvergenceSettings()
    validation: ValidationSettings = ValidationSettings()
    checkpoint: CheckpointSettings | None = None
    input_digest: str | None = None
    plugin_digest: str | None = None

    def __post_init__(self) -> None:
        """A task id that is no :func:`~rqml_dask.names.check_task_id` name (``..``, an empty
        part, a character it never holds) raises :class:`~rqml_dask.names.UnsafeName`: it names
        the task's checkpoint artifacts and records. Checked on every construction and copy
        (``dataclasses.replace``, as a node does on loading a task's data) and validation."""
        check_task_id(self.task_id)

    @functools.cached_property
    def key(self) -> str:
        """``task_id@fingerprint``: names the task's checkpoints and result in every store.
        Computed once per instance (a task is frozen) and never pickled with it: every
        process that receives a task fingerprints it itself.

        The fingerprint covers what determines the result (where the data is, region, ladder,
        parameters, shipped model code, convergence and validation settings), not where the result goes nor
        scheduling or checkpoint settings, so a changed pipeline never resumes from a
        checkpoint of a different computation, and one that only writes elsewhere reuses
        everything. The data's content is ``input_digest``, filled in by the worker from what
        it read (:func:`rqml_dask.problem.load_problem`): a recorded result or a checkpoint
        is used only if it was made from the same content."""
        body = {k: v for k, v in self.to_dict().items()
                if k not in ("output", "priority", "expected_difficulty", "checkpoint", "input_digest")}
        if body["plugin_digest"] is None:  # keys of pipelines without plugin files stay as they were
            del body["plugin_digest"]
        if body["input"]["camera"] is None:  # and those of pipelines without a camera
            del body["input"]["camera"]
        digest = hashlib.sha256(msgpack.packb(body)).hexdigest()[:16]
        return f"{self.task_id}@{digest}"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "key"}

    def to_dict(self) -> dict[str, Any]:
        return _TASK.dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        return _TASK.validate_python(data)

    def to_msgpack(self) -> bytes:
        return msgpack.packb(self.to_dict())

    @classmethod
    def from_msgpack(cls, payload: bytes) -> Self:
        return cls.from_dict(msgpack.unpackb(payload, strict_map_key=False))

    def to_json(self) -> str:
        return _TASK.dump_json(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        return _TASK.validate_json(text)


_TASK = TypeAdapter(RQMLTask)
