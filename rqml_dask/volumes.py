"""Zarr I/O of task data: open arrays with clear errors, read windows, write cores.

Every reader here validates what it reads (present, right rank, finite) and raises
:class:`InputError` naming the store, the array and the region; nothing is written then.
"""

from __future__ import annotations

import itertools

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from rqml_dask.task import ArrayRef, Region


class InputError(ValueError):
    """Input data that cannot be used as it is: missing, wrong shape, or not finite."""


def open_array(ref: ArrayRef, mode: str = "r") -> zarr.Array:
    """Open ``ref`` or raise :class:`InputError` saying which store or array is missing."""
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


def read_window(ref: ArrayRef, region: Region, dtype: Any = np.float32) -> np.ndarray:
    """The region's window of ``ref`` as a host array; refuses NaN or infinite values.

    Parts of the window outside the volume are the volume mirrored at its border
    (``numpy.pad`` mode ``symmetric``).
    """
    array = open_array(ref)
    inside = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(region.window, array.shape))
    data = np.asarray(array[inside], dtype=dtype)
    finite = np.isfinite(data)
    if not finite.all():
        first = tuple(int(i) + s.start for i, s in zip(np.argwhere(~finite)[0], inside))
        raise InputError(
            f"{ref}{_fmt(tuple((s.start, s.stop) for s in inside))} contains {data.size - int(finite.sum())} "
            f"NaN or infinite value(s), the first at {first}"
        )
    pad = [(s.start - a, b - s.stop) for (a, b), s in zip(region.window, inside)]
    if any(p for pair in pad for p in pair):
        data = np.pad(data, pad, mode="symmetric")
    return data


def check_values(ref: ArrayRef, accept_saturated: bool = False, nonnegative: bool = True) -> None:
    """Refuse (:class:`InputError`) an image the models cannot use as it is: NaN or infinite
    values, negative ones where the task class needs ``nonnegative`` data (Richardson-Lucy
    and its family need photon counts), or, in an integer image and unless ``accept_saturated``, saturated ones
    (at the type's maximum: the detector clipped them, and no deconvolution restores what
    was clipped). The message names the array, how many, where and the fix. Reads the
    array once, chunk by chunk."""
    array = open_array(ref)
    nonfinite, first_nonfinite = 0, None
    negative, lowest, lowest_at = 0, 0.0, None
    saturation = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.integer) and not accept_saturated else None
    saturated, first_saturated = 0, None
    grid = itertools.product(*(range(0, n, c) for n, c in zip(array.shape, array.chunks)))
    for start in grid:
        window = tuple(slice(s, min(s + c, n)) for s, c, n in zip(start, array.chunks, array.shape))
        raw = np.asarray(array[window])
        if saturation is not None and (clipped := raw == saturation).any():
            saturated += int(clipped.sum())
            first_saturated = first_saturated or tuple(int(i) + s.start for i, s in zip(np.argwhere(clipped)[0], window))
        data = raw.astype(np.float32, copy=False)
        finite = np.isfinite(data)
        if not finite.all():
            nonfinite += data.size - int(finite.sum())
            first_nonfinite = first_nonfinite or tuple(int(i) + s.start for i, s in zip(np.argwhere(~finite)[0], window))
        below = finite & (data < 0)
        if below.any():
            negative += int(below.sum())
            at = np.unravel_index(np.argmin(np.where(below, data, 0)), data.shape)
            if data[at] < lowest:
                lowest, lowest_at = float(data[at]), tuple(int(i) + s.start for i, s in zip(at, window))
    if nonfinite:
        raise InputError(f"{ref} contains {nonfinite} NaN or infinite value(s), the first at {first_nonfinite}: "
                         "fill or mask them before the run")
    if negative and nonnegative:
        raise InputError(f"{ref} has {negative} negative value(s), the lowest {lowest:.4g} at {lowest_at}: the models "
                         "need non-negative data (photon counts); subtract less background, or add an offset and "
                         "subtract it from the result")
    if saturated:
        raise InputError(f"{ref} has {saturated} saturated value(s) (= {saturation}, the most {array.dtype} holds), the "
                         f"first at {first_saturated}: the detector clipped them and deconvolution cannot restore them; "
                         "acquire below saturation, or set input.accept_saturated: true to deconvolve them as they are")


def read_core(ref: ArrayRef, region: Region, dtype: Any = None) -> np.ndarray:
    """The region's core of ``ref`` (in the array's own dtype unless ``dtype``)."""
    return np.asarray(open_array(ref)[region.core_slices], dtype=dtype)


def write_core(ref: ArrayRef, region: Region, data: np.ndarray) -> None:
    """Write a task's core into the output array (cores are chunk-aligned: no write races)."""
    open_array(ref, mode="r+")[region.core_slices] = data


def _fmt(box: tuple[tuple[int, int], ...]) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in box) + "]"
