"""The plugin contract: task classes, model families, and the registries that find them.

A *task class* (``deconvolution``, ``linear_solve``) says what a task's data are: the array
refined against (an image, a right-hand side), the operator read with it (a PSF, a
coefficient field), the dtype of results. A *model* is one refinement operator for one task
class. A model family is an algorithm (Richardson-Lucy, conjugate gradient); models are
ranked by ``size`` along an escalation ladder; switching family adds diversity. The engine
imports neither by name: built-in ones are found like any a user adds, through the
``rqml_dask.task_classes`` and ``rqml_dask.models`` entry-point groups, and a model may also
be given as ``"module:Class"`` where ``module`` is one of the pipeline's own plugin files
(``plugins:``, :mod:`rqml_dask.pipeline.plugins`, which names them here with
:func:`allow_plugin_module`, in the client and on every worker) or a module inside one; a
model name resolves nowhere else, and nothing is imported to find out that it does not.
:func:`check_model` tries a family on its class's probe problem before any task runs.
"""

from __future__ import annotations

import abc
import functools
import importlib
import math
from collections.abc import Hashable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar

import numpy as np

from rqml_dask.arrays import Array, ArrayBackend, inner_products, sum_of_squares

__all__ = [
    "Array", "ArrayBackend", "ModelCheckError", "RefinementModel", "TaskClass", "allow_plugin_module", "check_model",
    "inner_products", "is_plugin_module", "load_model", "load_task_class", "registered_models", "registered_task_classes", "sum_of_squares",
]

ENTRY_POINT_GROUP = "rqml_dask.models"
TASK_CLASS_GROUP = "rqml_dask.task_classes"

_plugin_modules: set[str] = set()
"""The top-level module names of the pipeline plugin files this process loaded."""


def allow_plugin_module(name: str) -> None:
    """Let ``module:Class`` model names resolve in the top-level module ``name`` (and the
    modules of its package): a pipeline's plugin file, loaded by this process."""
    _plugin_modules.add(name)


def is_plugin_module(module: str) -> bool:
    """Whether ``module`` is a plugin module (:func:`allow_plugin_module`) or inside one."""
    return module.partition(".")[0] in _plugin_modules


class TaskClass(abc.ABC):
    """What the engine needs to know of one kind of task, besides its models.

    A task refines an estimate against ``image`` (its window of the input array) with an
    ``operator`` array read beside it; the problem the models get holds the window as
    ``"image"`` and ``"observed"`` and the operator under :attr:`operator_key`.

    * ``dtype`` is the dtype of the data as the models get it, of estimates and of results.
    * ``photon_counts``: the data are photon counts, so a negative value is refused and the
      held-out stopping rule may thin them (:mod:`rqml_dask.held_out`).
    * ``data_is_estimate``: the data are themselves a first estimate of the result (a
      blurred image is one of the object; a right-hand side is none of the solution); the
      error against a ground truth is then reported for the input too.
    * ``default_operator`` / ``default_output`` name the arrays a pipeline file may omit.
    * :meth:`read_operator` reads the operator for one task from the array-like ``operator``
      (``shape`` and NumPy indexing) and checks it, raising :class:`ValueError` with what is
      wrong; :meth:`halo` is the halo, per axis, a task needs to read around its core
      (``auto``), given the operator as :meth:`read_operator` returns it for the first core
      and the most iterations a task runs.
    * :meth:`probe_problem` is a small problem, on ``backend``, on which :func:`check_model`
      tries a model family before any task runs.
    * :meth:`image_axes` names the axes of a result that is an image (``z``, ``y``, ``x``):
      an accepted result is then written as an OME-Zarr image (:mod:`rqml_dask.ome`);
      ``None`` (the default) for results that are not pictures.
    """

    name: ClassVar[str]
    operator_key: ClassVar[str]
    default_operator: ClassVar[str]
    default_output: ClassVar[str]
    dtype: ClassVar[str] = "float32"
    photon_counts: ClassVar[bool] = False
    data_is_estimate: ClassVar[bool] = False

    @abc.abstractmethod
    def read_operator(self, operator: Any, core: tuple[tuple[int, int], ...], image_shape: tuple[int, ...]) -> np.ndarray: ...

    @abc.abstractmethod
    def halo(self, operator: np.ndarray, image_ndim: int, iterations: int) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def probe_problem(self, backend: ArrayBackend) -> dict[str, Array]: ...

    def image_axes(self, ndim: int) -> tuple[str, ...] | None:
        return None

    def transform_shape(self, operator: np.ndarray, window_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape a task of this class with a window of ``window_shape`` computes on (its
        FFTs' shape, for a class that transforms); ``rqml run`` prints how much larger than
        a tile's core that is. By default the window itself."""
        return tuple(window_shape)


class RefinementModel(abc.ABC):
    """One model refining one task, written once for every array backend.

    Contract:

    * ``__init__(problem, backend, **params)`` prepares the per-task constants (e.g. a PSF's
      transfer function) once. ``problem`` maps names (``"image"``, ``"psf"``) to arrays
      already on ``backend``. Unknown ``params`` raise ``TypeError``.
    * ``start(estimate)`` sets the starting point: ``None`` for the model's own default, or
      the estimate another model left (escalation keeps the current estimate).
    * ``step()`` advances exactly one iteration, in place where the model can.
    * ``estimate`` is the current estimate (the task class's ``dtype``, the image's shape);
      callers must not modify it.
    * ``misfit()`` is the data-fit of the current estimate, recomputed apart from the
      iterations' own arithmetic and accumulated in float64, dimensionless (e.g. ``||forward(x) - data|| / ||data||``); the convergence
      heuristics read it.
    * ``prediction()`` is what the current estimate predicts the data to be (the forward
      model applied to it, the image's shape and units), or ``None`` (the default) for a
      family without one; the held-out stopping rule scores it (:mod:`rqml_dask.held_out`).
    * ``state()`` returns every array needed to resume exactly (always including
      ``"estimate"``); ``restore(state)`` resumes from it. Restored and uninterrupted runs
      give the same iterates. A model that sets ``immutable_state = True`` promises that
      ``step()`` replaces those arrays instead of writing into them, so the engine keeps them
      (for checkpoints and the stability check) without copying; otherwise they are live and
      the engine copies them.
    * A family that sets ``regularizes = True`` holds the estimate to a prior (smoothness,
      sparsity) rather than only fitting the data; where the held-out rule finds that every
      model fitted the noise, the engine climbs to such a model next, skipping the rest.
    * A regularising family that names ``strength`` (the parameter that sets how strongly
      it regularises: TV-RL's ``regularization``) lets a pipeline give that parameter as
      ``auto`` (its ``strength_grid``) or a list of values: the engine then chooses one per
      task from the held-out counts (:mod:`rqml_dask.strength`), ranking candidates by
      ``object_weights(shape)``: weights of a data residual's frequencies (``rfftn`` of an
      array of ``shape``) that make its weighted energy an error of the object
      (``1 / (|H|^2 + eps)`` where the transfer function ``H`` passes signal, 0 elsewhere),
      or ``None`` (the default) for a family without a transfer function.
    * A family whose step is itself a whole solve (a refinement step of hundreds of inner
      iterations) sets ``check_every``: the engine checks it after that many of its steps,
      whatever the pipeline's ``convergence.check_every`` (which the rest follow), so a task
      does not run steps past its tolerance waiting for a check.
    """

    task_class: ClassVar[str]
    family: ClassVar[str]
    size: ClassVar[int] = 1
    immutable_state: ClassVar[bool] = False
    regularizes: ClassVar[bool] = False
    check_every: ClassVar[int | None] = None
    strength: ClassVar[str | None] = None
    strength_grid: ClassVar[tuple[float, ...]] = ()

    def __init__(self, problem: Mapping[str, Array], backend: ArrayBackend, **params: Any) -> None:
        self.problem = problem
        self.backend = backend
        self.xp = backend.xp

    @abc.abstractmethod
    def start(self, estimate: Array | None = None) -> None: ...

    @abc.abstractmethod
    def step(self) -> None: ...

    @property
    @abc.abstractmethod
    def estimate(self) -> Array: ...

    @abc.abstractmethod
    def misfit(self) -> float: ...

    def prediction(self) -> Array | None:
        return None

    def object_weights(self, shape: tuple[int, ...]) -> Array | None:
        return None

    def batch_key(self) -> Hashable | None:
        """Models with equal non-``None`` keys can be advanced together by :meth:`step_batch`."""
        return None

    @classmethod
    def step_batch(cls, models: Sequence[RefinementModel]) -> None:
        """Advance each of ``models`` (equal :meth:`batch_key`) by exactly one iteration, with
        the same result as ``model.step()`` on each. The default steps them one by one; a
        model overrides it to stack them into one batched call, which on a GPU replaces many
        small kernel launches by a few large ones."""
        for model in models:
            model.step()

    def state(self) -> dict[str, Array]:
        return {"estimate": self.estimate}

    def restore(self, state: Mapping[str, Array]) -> None:
        self.start(state["estimate"])


class UnknownModelError(LookupError):
    """A model name that is neither a registered entry point nor ``module:Class`` of a
    plugin module, or a class that does not keep the contract (the message names it and what
    it lacks)."""


class ModelCheckError(ValueError):
    """A model family that failed its probe (:func:`check_model`); the message names it."""


def load_model(name: str) -> type[RefinementModel]:
    """The model class registered as ``name``, or ``Class`` of a plugin module for
    ``"module:Class"`` (looked up afresh each time: a plugin module shipped again is the new
    one); a ``module`` that is no plugin module (:func:`is_plugin_module`) is refused before
    anything is imported. Refuses a class that is no :class:`RefinementModel`, lacks a
    required method, or names no ``task_class``."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if not is_plugin_module(module_name):
            raise UnknownModelError(
                f"model {name!r}: {module_name!r} is not one of the pipeline's plugin files (plugins: "
                f"{', '.join(sorted(_plugin_modules)) or 'none'}); a model is a registered one "
                f"({', '.join(registered_models())}) or module:Class of a file listed under plugins:")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownModelError(f"model {name!r}: cannot import {module_name!r}: {exc}") from None
        try:
            cls = getattr(module, attr)
        except AttributeError:
            raise UnknownModelError(f"model {name!r}: module {module_name!r} has no {attr!r}") from None
    else:
        cls = _registered_model(name)
    if not (isinstance(cls, type) and issubclass(cls, RefinementModel)):
        raise UnknownModelError(f"model {name!r} is {cls!r}, not a RefinementModel subclass")
    if cls.__abstractmethods__:
        raise UnknownModelError(f"model {name!r} ({cls.__qualname__}) lacks the required method(s) "
                                f"{', '.join(sorted(cls.__abstractmethods__))}")
    if not isinstance(getattr(cls, "task_class", None), str):
        raise UnknownModelError(f"model {name!r} ({cls.__qualname__}) sets no task_class")
    return cls


@functools.cache
def _registered_model(name: str) -> type:
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        raise UnknownModelError(f"unknown model {name!r}; registered models: {', '.join(registered_models())}")
    return next(iter(found)).load()


def registered_models() -> list[str]:
    """Names of every model in the ``rqml_dask.models`` entry-point group."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


@functools.cache
def load_task_class(name: str) -> TaskClass:
    """The task class registered as ``name`` in the ``rqml_dask.task_classes`` group."""
    found = entry_points(group=TASK_CLASS_GROUP, name=name)
    if not found:
        raise UnknownModelError(f"unknown task class {name!r}; registered: {', '.join(registered_task_classes())}")
    cls = next(iter(found)).load()
    if not (isinstance(cls, type) and issubclass(cls, TaskClass)):
        raise UnknownModelError(f"task class {name!r} is {cls!r}, not a TaskClass subclass")
    return cls()


def registered_task_classes() -> list[str]:
    """Names of every task class in the ``rqml_dask.task_classes`` entry-point group."""
    return sorted(ep.name for ep in entry_points(group=TASK_CLASS_GROUP))


def check_model(name: str, task_class: str, params: Mapping[str, Any], backend: ArrayBackend) -> None:
    """Try model ``name`` on its task class's probe problem: built with ``params``, started,
    stepped twice, its estimate must keep the image's shape and the class's dtype, and its
    misfit must be a finite number. Raises :class:`UnknownModelError` or
    :class:`ModelCheckError` naming the model and what it did wrong."""
    cls = load_model(name)
    if cls.task_class != task_class:
        raise ModelCheckError(f"model {name!r} is for task class {cls.task_class!r}, not {task_class!r}")
    kind = load_task_class(task_class)
    problem = kind.probe_problem(backend)
    shape, dtype = tuple(problem["image"].shape), np.dtype(kind.dtype)
    doing = "building it"
    try:
        model = cls(problem, backend, **params)
        doing = "start()"
        model.start(None)
        for doing in ("step()", "a second step()"):
            model.step()
            estimate = model.estimate
            if tuple(estimate.shape) != shape or np.dtype(str(estimate.dtype)) != dtype:
                raise ModelCheckError(f"model {name!r} ({cls.__qualname__}): after {doing} the estimate has shape "
                                      f"{tuple(estimate.shape)} and dtype {estimate.dtype}; the {task_class} probe "
                                      f"problem needs shape {shape} and dtype {dtype}")
        doing = "misfit()"
        misfit = model.misfit()
        if not (isinstance(misfit, float | int) and math.isfinite(misfit)):
            raise ModelCheckError(f"model {name!r} ({cls.__qualname__}): misfit() returned {misfit!r}, not a finite number")
        doing = "state() and restore()"
        model.restore(model.state())
    except ModelCheckError:
        raise
    except Exception as exc:
        raise ModelCheckError(f"model {name!r} ({cls.__qualname__}) failed on the {task_class} probe problem in "
                              f"{doing}: {type(exc).__name__}: {exc}") from None
