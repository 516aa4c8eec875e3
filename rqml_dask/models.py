"""The model-plugin contract and the registry that finds model families.

A *model* is one refinement operator for one task class (``deconvolution``...). A model
family is an algorithm (Richardson-Lucy, Landweber); models of one family are ranked by
``size`` along an escalation ladder; switching family adds diversity. The engine imports no
model by name: built-in models are found like any a user adds, through the
``rqml_dask.models`` entry-point group, or given directly as ``"package.module:Class"``.
"""

from __future__ import annotations

import abc
import functools
import importlib
from collections.abc import Hashable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar

from rqml_dask.arrays import Array, ArrayBackend

__all__ = ["Array", "ArrayBackend", "RefinementModel", "load_model", "registered_models"]

ENTRY_POINT_GROUP = "rqml_dask.models"


class RefinementModel(abc.ABC):
    """One model refining one task, written once for every array backend.

    Contract:

    * ``__init__(problem, backend, **params)`` prepares the per-task constants (e.g. a PSF's
      transfer function) once. ``problem`` maps names (``"image"``, ``"psf"``) to arrays
      already on ``backend``. Unknown ``params`` raise ``TypeError``.
    * ``start(estimate)`` sets the starting point: ``None`` for the model's own default, or
      the estimate another model left (escalation keeps the current estimate).
    * ``step()`` advances exactly one iteration, in place where the model can.
    * ``estimate`` is the current estimate (float32, the image's shape); callers must not
      modify it.
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
    """

    task_class: ClassVar[str]
    family: ClassVar[str]
    size: ClassVar[int] = 1
    immutable_state: ClassVar[bool] = False
    regularizes: ClassVar[bool] = False

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
    """A model name that is neither a registered entry point nor ``module:Class``."""


@functools.cache
def load_model(name: str) -> type[RefinementModel]:
    """The model class registered as ``name``, or imported from ``"module:Class"``."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
    else:
        found = entry_points(group=ENTRY_POINT_GROUP, name=name)
        if not found:
            raise UnknownModelError(
                f"unknown model {name!r}; registered models: {', '.join(registered_models())}"
            )
        cls = next(iter(found)).load()
    if not (isinstance(cls, type) and issubclass(cls, RefinementModel)):
        raise UnknownModelError(f"model {name!r} is {cls!r}, not a RefinementModel subclass")
    return cls


def registered_models() -> list[str]:
    """Names of every model in the ``rqml_dask.models`` entry-point group."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
