"""Zarr I/O of task data: open arrays with clear errors, read windows, write cores.

Every reader here validates what it reads (present, right rank, finite) and raises
:class:`InputError` naming the store, the array and the region; nothing is written then.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from rqml_dask.task import ArrayRef, Region


class InputError(ValueError):
    """Input data that cannot be used as it is: missing, wrong shape, or not finite."""


OPENED_KEPT = 64
"""Local arrays :func:`open_array` keeps open, the most recently used."""
_opened: OrderedDict[tuple[str, str, str], tuple[tuple[int, int, int], zarr.Array]] = OrderedDict()
_opened_lock = threading.Lock()


def open_array(ref: ArrayRef, mode: str = "r") -> zarr.Array:
    """Open ``ref`` or raise :class:`InputError` saying which store or array is missing.

    A local array opened before is used again while its metadata file is the one it was
    opened from (same inode, size and modification time): a task reads and writes several
    arrays, and opening one costs two metadata reads. An array replaced or deleted since is
    opened anew (or refused)."""
    stamp, held_key = _metadata_stamp(ref), (ref.store, ref.path, mode)
    if stamp is not None:
        with _opened_lock:
            held = _opened.get(held_key)
            if held is not None and held[0] == stamp:
                _opened.move_to_end(held_key)
                return held[1]
    array = _open(ref, mode)
    if stamp is not None:
        with _opened_lock:
            _opened[held_key] = (stamp, array)
            while len(_opened) > OPENED_KEPT:
                _opened.popitem(last=False)
    return array


def _metadata_stamp(ref: ArrayRef) -> tuple[int, int, int] | None:
    """Inode, size and modification time of a local array's ``zarr.json``; ``None`` for a
    remote store or an array that is not there."""
    if "://" in ref.store:
        return None
    try:
        info = os.stat(Path(ref.store) / ref.path / "zarr.json")
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _open(ref: ArrayRef, mode: str) -> zarr.Array:
    if "://" not in ref.store and not Path(ref.store).exists():
        raise InputError(f"Zarr store {ref.store} does not exist")
    try:
        group = zarr.open_group(ref.store, mode="r" if mode == "r" else "r+")
    except Exception as exc:
        raise InputError(f"{ref.store} is not a readable Zarr group: {exc}") from None
    try:
        node = group[ref.path]
    except KeyError:
        raise InputError(
            f"Zarr store {ref.store} has no array {ref.path!r} (it has: {', '.join(sorted(group.keys())) or 'nothing'})"
        ) from None
    if not isinstance(node, zarr.Array):
        raise InputError(f"{ref} is a group, not an array")
    return node


def read_window(ref: ArrayRef, region: Region, dtype: Any = np.float32, *, nonnegative: bool = True,
                accept_saturated: bool = False) -> np.ndarray:
    """The region's window of ``ref`` as a host array, its values checked
    (:func:`check_values`) where they are read: the whole input is checked by the tasks
    that read it, never by one process reading all of it.

    A window reaching past the array (a region planned for another shape) is refused.
    """
    array = open_array(ref)
    if any(a < 0 or b > n for (a, b), n in zip(region.window, array.shape)) or len(region.window) != array.ndim:
        raise InputError(f"{ref} {tuple(array.shape)} does not hold the window {_fmt(region.window)}: the task was "
                         "planned for an array of another shape")
    raw = np.asarray(array[region.window_slices])
    data = raw.astype(dtype, copy=False)
    check_values(ref, raw, data, tuple(a for a, _ in region.window), nonnegative=nonnegative,
                 saturation=None if accept_saturated else _saturation(array.dtype))
    return data


def _saturation(dtype: np.dtype) -> int | None:
    """The value a detector clips an image of ``dtype`` at: an integer type's maximum."""
    return int(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else None


def check_values(ref: ArrayRef, raw: np.ndarray, data: np.ndarray, origin: tuple[int, ...], *, nonnegative: bool,
                 saturation: int | None) -> None:
    """Refuse (:class:`InputError`) a part of ``ref`` the models cannot use as it is: ``raw``,
    read at ``origin`` in the array's own dtype, and ``data``, the same as the models get
    it. Refused: NaN or infinite values, negative ones where the task class needs
    ``nonnegative`` data (Richardson-Lucy and its family need photon counts), and values at
    ``saturation`` (the detector clipped them, and no deconvolution restores what was
    clipped; ``None``: not checked). The message names the array, how many, the first
    (or lowest) position in the array, and the fix."""

    def at(index) -> tuple[int, ...]:
        return tuple(int(i) + o for i, o in zip(index, origin))

    where = _fmt(tuple((o, o + n) for o, n in zip(origin, data.shape)))

    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(f"{ref} contains {data.size - int(finite.sum())} NaN or infinite value(s) in {where}, the first at "
                         f"{at(np.argwhere(~finite)[0])}: fill or mask them before the run")
    if nonnegative and (below := data < 0).any():
        lowest = np.unravel_index(np.argmin(data), data.shape)
        raise InputError(f"{ref} has {int(below.sum())} negative value(s) in {where}, the lowest {float(data[lowest]):.4g} at "
                         f"{at(lowest)}: the models need non-negative data (photon counts); subtract less background, "
                         "or add an offset and subtract it from the result")
    if saturation is not None and (clipped := raw == saturation).any():
        raise InputError(f"{ref} has {int(clipped.sum())} saturated value(s) (= {saturation}, the most {raw.dtype} holds) in {where}, "
                         f"the first at {at(np.argwhere(clipped)[0])}: the detector clipped them and deconvolution cannot "
                         "restore them; acquire below saturation, or set input.accept_saturated: true to deconvolve them "
                         "as they are")


def read_core(ref: ArrayRef, region: Region, dtype: Any = None) -> np.ndarray:
    """The region's core of ``ref`` (in the array's own dtype unless ``dtype``)."""
    return np.asarray(open_array(ref)[region.core_slices], dtype=dtype)


def write_core(ref: ArrayRef, region: Region, data: np.ndarray) -> None:
    """Write a task's core into the output array (cores are chunk-aligned: no write races)."""
    open_array(ref, mode="r+")[region.core_slices] = data


OUTCOMES_ARRAY = "rqml_outcomes"
"""The array of an output store that holds its run's outcome records, one JSON string a task."""
OUTCOMES_CHUNK = 1024


def write_outcome_records(store: str | Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write a run's outcome records (JSON objects) into ``store`` as :data:`OUTCOMES_ARRAY`,
    replacing any there; what the store's ``rqml`` attribute says of them (its ``outcomes``).
    An array, not the attribute itself: at 10^4 tasks with their convergence traces the
    records are a hundred megabytes, which every opener of the group would parse."""
    array = zarr.open_group(store, mode="r+").create_array(
        OUTCOMES_ARRAY, shape=(len(records),), chunks=(min(max(len(records), 1), OUTCOMES_CHUNK),), dtype=str, overwrite=True)
    if records:
        array[:] = np.array([json.dumps(record, allow_nan=False) for record in records], dtype=object)
    return {"array": OUTCOMES_ARRAY, "count": len(records)}


def read_outcome_records(store: str | Path, outcomes: dict[str, Any]) -> list[dict[str, Any]]:
    """The records :func:`write_outcome_records` wrote into ``store`` (``outcomes``: what it
    returned); :class:`InputError` if they are not there as it says."""
    try:
        array = zarr.open_array(store, path=outcomes["array"], mode="r")
        records = [json.loads(text) for text in array[:]] if array.shape[0] else []
    except (KeyError, TypeError, ValueError, FileNotFoundError, zarr.errors.NodeNotFoundError) as exc:
        raise InputError(f"{store}: the run's outcome records are missing or unreadable ({type(exc).__name__}: {exc})") from None
    if len(records) != outcomes.get("count"):
        raise InputError(f"{store}: {len(records)} outcome records, the run recorded {outcomes.get('count')}")
    return records


def _fmt(box: tuple[tuple[int, int], ...]) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in box) + "]"
