"""How a pipeline's plugin file reaches the workers: Dask's ``UploadFile``, and its name.

Apart from :mod:`rqml_dask.pipeline.plugins` because it imports Dask, which reading a
pipeline file does not need.
"""

from __future__ import annotations

from distributed import Worker
from distributed.diagnostics.plugin import UploadFile

from rqml_dask.models import allow_plugin_module
from rqml_dask.node.kept_plugins import keep_plugin


class PluginUpload(UploadFile):
    """Dask's ``UploadFile`` of one plugin (a ``.py`` file or a zipped package) that, once the
    worker has loaded it, names its module a plugin module there
    (:func:`~rqml_dask.models.allow_plugin_module`): ``module:Class`` model names resolve in it.
    A node with a node directory keeps a copy (:mod:`rqml_dask.node.kept_plugins`)."""

    def __init__(self, filepath: str, module: str) -> None:
        super().__init__(filepath)
        self.module = module

    async def setup(self, worker: Worker) -> None:
        await super().setup(worker)
        allow_plugin_module(self.module)
        if (node_directory := getattr(worker, "node_directory", None)) is not None:  # for a restart without scheduler
            keep_plugin(node_directory, self.filename, self.data, self.module)
