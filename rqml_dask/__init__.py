"""rqml-dask: data-parallel iterative refinement (RQML) pipelines on Dask and dask-cuda.

The names below load on first use (PEP 562), so ``import rqml_dask.task`` or a model
family's ``import rqml_dask.models`` loads no Dask.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Pipeline": "rqml_dask.pipeline",
    "RunReport": "rqml_dask.pipeline",
    "RQMLTask": "rqml_dask.task",
    "TaskCheckpoint": "rqml_dask.checkpoint",
    "TaskOutcome": "rqml_dask.messages",
}

if TYPE_CHECKING:
    from rqml_dask.checkpoint import TaskCheckpoint
    from rqml_dask.messages import TaskOutcome
    from rqml_dask.pipeline import Pipeline, RunReport
    from rqml_dask.task import RQMLTask


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rqml_dask' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
