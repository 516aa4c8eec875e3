"""rqml-dask: data-parallel iterative refinement (RQML) pipelines on Dask and dask-cuda."""

from rqml_dask.checkpoint import TaskCheckpoint
from rqml_dask.execution import TaskOutcome
from rqml_dask.pipeline import Pipeline, RunReport
from rqml_dask.task import RQMLTask

__all__ = ["Pipeline", "RQMLTask", "RunReport", "TaskCheckpoint", "TaskOutcome"]
