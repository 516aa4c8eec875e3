"""Model families shipped with a pipeline: imported here, uploaded to every worker.

A pipeline's ``plugins:`` names Python files (``my_models.py``) or package directories
(``my_models/`` with an ``__init__.py``); their models go on the ladder as
``module:Class``. :func:`import_plugins` imports them in this process (so the pipeline file
is checked against them before anything runs); :func:`ship_plugins` registers each with the
cluster as a :class:`~rqml_dask.pipeline.plugin_upload.PluginUpload` worker plugin (Dask's
own ``UploadFile``, a package directory zipped), which the scheduler keeps and runs on every
worker, those that join later included. Both name the module a plugin module
(:func:`rqml_dask.models.allow_plugin_module`): ``module:Class`` model names resolve in
those modules only. :func:`plugin_digest` is what ties a task's key to the code shipped.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import sys
import tempfile
import zipfile
from pathlib import Path

from typing import TYPE_CHECKING

from rqml_dask.models import RefinementModel, allow_plugin_module, is_plugin_module, load_model, registered_models

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # Dask is imported where plugins are shipped: reading a pipeline file needs none
    from distributed import Client

    from rqml_dask.pipeline.plugin_upload import PluginUpload


class PluginError(ValueError):
    """A plugin path that cannot be used; the message names it."""


def _files(path: Path) -> list[Path]:
    """The Python files of a plugin, in a stable order."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def _check(path: Path) -> str:
    """The module name ``path`` is imported as; :class:`PluginError` if it is not a plugin."""
    if path.is_file() and path.suffix == ".py":
        return path.stem
    if path.is_dir() and (path / "__init__.py").is_file():
        return path.name
    if not path.exists():
        raise PluginError(f"{path} does not exist")
    raise PluginError(f"{path} is neither a .py file nor a package directory (with an __init__.py)")


def import_plugins(paths: list[Path]) -> None:
    """Import every plugin here, afresh (a module imported before from the same place is
    reloaded). Refuses a plugin whose module name is taken by another module (``numpy.py``)
    and one that does not import, with the path and the error."""
    for path in paths:
        name = _check(path)
        where = str(path.parent)
        loaded = sys.modules.get(name)
        if loaded is not None and not str(getattr(loaded, "__file__", "") or "").startswith(str(path)):
            raise PluginError(f"{path}: the module name {name!r} is taken by {getattr(loaded, '__file__', loaded)}: rename it")
        if where not in sys.path:
            sys.path.insert(0, where)
        importlib.invalidate_caches()
        try:
            importlib.reload(loaded) if loaded is not None else importlib.import_module(name)
        except Exception as exc:
            raise PluginError(f"{path} does not import: {type(exc).__name__}: {exc}") from None
        allow_plugin_module(name)


def plugin_digest(paths: list[Path]) -> str | None:
    """A digest of the plugins' names and code (``None`` without plugins)."""
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in paths:
        for file in _files(path):
            digest.update(str(file.relative_to(path.parent)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _upload(path: Path) -> PluginUpload:
    """The upload plugin for one plugin: the file itself, or the package zipped."""
    from rqml_dask.pipeline.plugin_upload import PluginUpload

    name = _check(path)
    if path.is_file():
        return PluginUpload(str(path), name)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in _files(path):
            archive.write(file, str(file.relative_to(path.parent)))
    with tempfile.TemporaryDirectory() as tmp:  # named by content: a new version is a new path on sys.path
        zipped = Path(tmp) / f"{path.name}-{plugin_digest([path])}.zip"
        zipped.write_bytes(buffer.getvalue())
        return PluginUpload(str(zipped), name)


def ship_plugins(client: Client, paths: list[Path], attempts: int = 3) -> None:
    """Upload every plugin to the cluster of ``client``: to each worker now, and, kept by the
    scheduler, to each worker that joins later. Shipping one again replaces it.

    A worker that leaves while the scheduler hands it a plugin (a node quarantined at a
    reconnection, a node killed) breaks that call: the scheduler has kept the plugin, and it
    is shipped again, up to ``attempts`` times in all, to the workers there are then."""
    for path in paths:
        upload, name = _upload(path), f"rqml-plugin-{_check(path)}"
        for attempt in range(1, attempts + 1):
            try:
                client.register_plugin(upload, name=name)
                break
            except OSError as exc:  # distributed's CommClosedError is one
                if attempt == attempts:
                    raise
                logger.warning("shipping the plugin %s again: a worker left while it was shipped (%s)", path, exc)


def available_models() -> dict[str, dict[str, str]]:
    """The models this process can run: every registered one, and every model class of a
    plugin module it loaded (as ``module:Class``), each with its task class and family."""
    found: dict[str, type[RefinementModel]] = {name: load_model(name) for name in registered_models()}
    registered = set(found.values())
    pending = list(RefinementModel.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        name = f"{cls.__module__}:{cls.__qualname__}"
        if cls not in registered and not cls.__abstractmethods__ and is_plugin_module(cls.__module__) \
                and sys.modules.get(cls.__module__) is not None and getattr(sys.modules[cls.__module__], cls.__qualname__, None) is cls:
            found[name] = cls
    return {name: {"task_class": getattr(cls, "task_class", "?"), "family": getattr(cls, "family", cls.__name__)}
            for name, cls in sorted(found.items())}
