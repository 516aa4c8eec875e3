"""Checkpoint artifacts: the arrays a task needs to resume, one Zarr array each.

Artifacts live under a root directory that every worker can reach (by default next to the
pipeline's output store, which every worker writes anyway), at
``ROOT/TASK_KEY/ITERATION-NODE/NAME``. They are written uncompressed: they are transient, and
a checkpoint's cost is the time the node's writer spends on it. They are chunked along their
first axis (about :data:`CHUNK_BYTES` a chunk) and written and digested chunk by chunk, so a
writer holds no copy of a whole array (a model's state is often a view into a larger buffer). A reader checks each array
against the SHA-256 its checkpoint record holds (:meth:`ArtifactRef.check`).

Every path is checked to resolve under the root (``..`` and symbolic links followed,
:func:`rqml_dask.names.inside`) before anything is written, read or deleted there: a task key
that is no task id (:func:`rqml_dask.names.check_task_id`) or a path that leaves the root
raises :class:`~rqml_dask.names.UnsafeName` (a record pointing outside it, on reading:
:class:`~rqml_dask.checkpoint.CheckpointError`), and nothing is touched.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import zarr

from rqml_dask.checkpoint import ArtifactRef, CheckpointError
from rqml_dask.names import UnsafeName, check_task_id, inside


CHUNK_BYTES = 4 * 2**20
"""About the bytes of one chunk of an artifact."""


def _chunks(array: np.ndarray) -> tuple[int, ...]:
    """Whole along every axis but the first, which is cut to about :data:`CHUNK_BYTES` a chunk."""
    if array.ndim == 0:
        return ()
    plane = array.dtype.itemsize * int(np.prod(array.shape[1:]))
    return (max(1, min(array.shape[0], CHUNK_BYTES // max(plane, 1))), *array.shape[1:])


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", part)


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def task_dir(self, task_key: str) -> Path:
        """Where the task ``task_key``'s artifacts go, checked to lie under the root."""
        check_task_id(task_key)
        return self._inside(self.root / "tasks" / Path(*[_safe(p) for p in task_key.split("/")]), f"artifacts of task {task_key!r}")

    def _inside(self, path: Path, what: str) -> Path:
        inside(self.root, path, what)
        return path

    def write(self, task_key: str, iteration: int, node: str, arrays: Mapping[str, np.ndarray]) -> tuple[ArtifactRef, ...]:
        """Write each array; return references with their digests (written before the record)."""
        directory = self.task_dir(task_key) / f"{iteration:09d}-{_safe(node)}"
        refs = []
        for name, array in arrays.items():
            array = np.asarray(array)
            path = self._inside(directory / _safe(name), f"artifact {name!r} of task {task_key!r}")
            zarr.create_array(store=str(path), data=array, chunks=_chunks(array), compressors=None, overwrite=True)
            refs.append(ArtifactRef(name, str(path), tuple(array.shape), str(array.dtype), ArtifactRef.digest_of(array)))
        return tuple(refs)

    def read(self, ref: ArtifactRef) -> np.ndarray:
        """The artifact's array, verified against its digest; :class:`CheckpointError` if it is
        missing, outside the root, unreadable or not what the record says."""
        try:
            self._inside(Path(ref.location), f"artifact {ref.name!r}")
        except UnsafeName as exc:
            raise CheckpointError(str(exc)) from None
        try:
            array = np.asarray(zarr.open_array(store=ref.location, mode="r")[...])
        except Exception as exc:
            raise CheckpointError(f"artifact {ref.name!r} at {ref.location}: unreadable ({type(exc).__name__}: {exc})") from None
        ref.check(array)
        return array

    def keep_only(self, task_key: str, referenced: Iterable[str]) -> None:
        """Delete the task's artifact sets that no kept record refers to."""
        keep = {Path(location).parent for location in referenced}
        directory = self.task_dir(task_key)
        if not directory.is_dir():
            return
        for child in directory.iterdir():
            if child not in keep:
                shutil.rmtree(child, ignore_errors=True)

    def delete_task(self, task_key: str) -> None:
        shutil.rmtree(self.task_dir(task_key), ignore_errors=True)
