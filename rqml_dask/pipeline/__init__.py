"""The client side: pipeline files (:mod:`.config`), :class:`Pipeline` (tasks, submit, run),
voting and shipped model files. The names below load on first use (PEP 562): reading a
pipeline file (``rqml_dask.pipeline.config``) loads no Dask."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rqml_dask._lazy import lazy_exports

_EXPORTS = {
    "PipelineConfig": "rqml_dask.pipeline.config",
    "PipelineConfigError": "rqml_dask.pipeline.config",
    "load_pipeline_config": "rqml_dask.pipeline.config",
    "Pipeline": "rqml_dask.pipeline.pipeline",
    "PipelineError": "rqml_dask.pipeline.pipeline",
    "RunReport": "rqml_dask.pipeline.pipeline",
}

if TYPE_CHECKING:
    from rqml_dask.pipeline.config import PipelineConfig, PipelineConfigError, load_pipeline_config
    from rqml_dask.pipeline.pipeline import Pipeline, PipelineError, RunReport

__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
