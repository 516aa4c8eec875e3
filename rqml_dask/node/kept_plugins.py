"""A node keeps the pipeline plugin files it was sent, to resume their jobs after a restart.

A pipeline's model files reach a worker as a Dask worker plugin
(:class:`~rqml_dask.pipeline.plugin_upload.PluginUpload`), which the scheduler sends when the
worker registers. A node restarted while it has no scheduler (degraded mode) must resume
or re-park jobs whose ladder names ``module:Class`` models of those files before any
scheduler sends them again. So a node with a node directory (an
:class:`~rqml_dask.node.worker.RQMLWorker`) keeps a copy of each file it was sent
(:func:`keep_plugin`, ``NODE_DIRECTORY/plugins/``), and at start makes the kept ones
importable and names their modules plugin modules (:func:`restore_plugins`). The latest
file of a name wins, as with Dask's own upload.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rqml_dask.models import allow_plugin_module

KEPT = "plugins"
"""The folder of the node directory where the files are kept."""


def keep_plugin(node_directory: Path, filename: str, data: bytes, module: str) -> None:
    """Keep the plugin file ``filename`` (``data``) that loads as the top-level ``module``."""
    kept = node_directory / KEPT
    kept.mkdir(parents=True, exist_ok=True)
    (kept / filename).write_bytes(data)
    (kept / f"{filename}.module").write_text(module)


def restore_plugins(node_directory: Path) -> list[str]:
    """Make every kept plugin file importable (its folder, or the zip itself, on
    ``sys.path``) and name its module a plugin module; the modules' names."""
    kept = node_directory / KEPT
    modules = []
    for marker in sorted(kept.glob("*.module")) if kept.is_dir() else []:
        file = marker.with_suffix("")
        if not file.is_file():
            continue
        where = str(file if file.suffix in (".zip", ".egg") else kept)
        if where not in sys.path:
            sys.path.insert(0, where)
        module = marker.read_text().strip()
        allow_plugin_module(module)
        modules.append(module)
    return modules
