"""Pipelines: YAML configuration, cutting a volume into RQML tasks, running them on Dask."""

from rqml_dask.pipeline.config import PipelineConfig, PipelineConfigError, load_pipeline_config
from rqml_dask.pipeline.pipeline import Pipeline, PipelineError, RunReport

__all__ = ["Pipeline", "PipelineConfig", "PipelineConfigError", "PipelineError", "RunReport", "load_pipeline_config"]
