"""rqml-dask: data-parallel iterative refinement (RQML) pipelines on Dask and dask-cuda.

The names below load on first use (PEP 562), so ``import rqml_dask.task`` or a model
family's ``import rqml_dask.models`` loads no Dask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rqml_dask._lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
