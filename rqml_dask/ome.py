"""OME-Zarr (OME-NGFF 0.5): input images given as OME images, results written as one.

An input's ``image`` may name an OME image group (its full-resolution level is read) and
brings its voxel size. A finished, accepted result becomes an OME image: the output group
carries ``ome`` multiscales metadata over the result array (level 0) and a pyramid of
downsampled copies of it, so napari and Fiji open it with its axes and physical scale.
The metadata is written by ``ome-zarr`` (:func:`ome_zarr.writer.write_multiscales_metadata`)
and validated by ``ome-zarr-models`` before the call returns; the pyramid is computed with
``dask.array`` (bounded memory, chunk by chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import zarr

PYRAMID_MIN_SIZE = 256
"""An ``auto`` pyramid halves y and x until both are at most this size."""


@dataclass(frozen=True)
class VoxelSize:
    """Physical size of one voxel along each axis, in ``unit`` (an NGFF unit name such as
    ``micrometer``; ``None``: unknown)."""

    scale: tuple[float, ...]
    unit: str | None = "micrometer"


def _multiscale(group: zarr.Group) -> dict | None:
    """The first ``multiscales`` entry of an OME image group (0.5 ``ome`` or 0.4 attributes)."""
    attrs = group.attrs.asdict()
    multiscales = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    return multiscales[0] if multiscales else None


def image_array(store: str, path: str) -> str:
    """The array path of the image at ``path`` in ``store``: ``path`` itself if it is an array
    (or missing: the reader then says so), the full-resolution level if it is an OME image
    group (``""`` or ``"."``: the store's root)."""
    try:
        node = zarr.open_group(store, mode="r")
        if path not in ("", "."):
            node = node[path]
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
        return path
    if not isinstance(node, zarr.Group) or (multiscale := _multiscale(node)) is None:
        return path
    return str(PurePosixPath(path.strip("./") or ".") / multiscale["datasets"][0]["path"]).removeprefix("./")


def voxel_size(store: str, path: str) -> VoxelSize | None:
    """The voxel size of the OME image at ``path`` (an OME image group, or the array that is
    the full-resolution level of one), from its level 0 scale and its axes' units; ``None``
    for a plain array."""
    try:
        root = zarr.open_group(store, mode="r")
        node = root if path in ("", ".") else root[path]
        if isinstance(node, zarr.Array):
            parent, _, name = path.rpartition("/")
            node = root[parent] if parent else root
        else:
            name = None
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
        return None
    multiscale = _multiscale(node)
    if multiscale is None or name is not None and multiscale["datasets"][0]["path"] != name:
        return None
    scale = next((t["scale"] for t in multiscale["datasets"][0].get("coordinateTransformations", []) if t["type"] == "scale"), None)
    if scale is None:
        return None
    units = {axis.get("unit") for axis in multiscale.get("axes", []) if isinstance(axis, dict) and axis.get("type") == "space"}
    return VoxelSize(tuple(float(s) for s in scale), units.pop() if len(units) == 1 else None)


def pyramid_levels(shape: tuple[int, ...], levels: int | str) -> int:
    """How many levels below full resolution to write: ``levels`` itself, or for ``auto``
    the halvings of y and x until both are at most :data:`PYRAMID_MIN_SIZE`."""
    if levels != "auto":
        return int(levels)
    largest = max(shape[-2:])
    return max(math.ceil(math.log2(largest / PYRAMID_MIN_SIZE)), 0) if largest > PYRAMID_MIN_SIZE else 0


def level_name(array: str, level: int) -> str:
    return array if level == 0 else f"{array}_s{level}"


def write_image(store: str, array: str, axes: tuple[str, ...], voxel: VoxelSize | None, levels: int | str = "auto",
                scheduler: Any = "threads") -> list[str]:
    """Make ``store`` an OME image of its array ``array`` (level 0): write the pyramid
    (``array_s1``, ``array_s2``, … each a 2x2 mean over y and x of the one above, chunked
    like level 0) and the multiscales metadata with ``axes`` and ``voxel`` (unknown: a scale
    of 1 and no unit), then validate the group with ``ome-zarr-models``. Returns the
    levels' array paths. Level 0 is only read, by ``scheduler`` (a Dask scheduler name, or a
    ``distributed.Client`` to read it on the cluster, where the data is)."""
    import dask.array as da  # here: a run that writes no pyramid (all reused) never needs it
    from ome_zarr.writer import write_multiscales_metadata
    from ome_zarr_models.v05.image import Image

    group = zarr.open_group(store, mode="r+")
    base = group[array]
    scale = voxel.scale if voxel is not None else (1.0,) * base.ndim
    if len(scale) != base.ndim:
        raise ValueError(f"voxel size {tuple(scale)} has {len(scale)} axes, {store}::{array} has {base.ndim}")
    paths = [array]
    source = da.from_zarr(base)
    for level in range(1, pyramid_levels(base.shape, levels) + 1):
        source = da.coarsen(_mean, source, {base.ndim - 2: 2, base.ndim - 1: 2}, trim_excess=True)
        if min(source.shape[-2:]) == 0:
            break
        name = level_name(array, level)
        chunks = tuple(min(c, n) for c, n in zip(base.chunks, source.shape))
        target = group.create_array(name, shape=source.shape, chunks=chunks, dtype=base.dtype, dimension_names=axes, overwrite=True)
        da.store(source.rechunk(chunks), target, lock=False, scheduler=scheduler)
        source = da.from_zarr(target)
        paths.append(name)
    datasets = []
    for level, path in enumerate(paths):
        factor = [1.0] * (base.ndim - 2) + [2.0**level] * 2
        transforms = [{"type": "scale", "scale": [s * f for s, f in zip(scale, factor)]}]
        if level:  # a mean over 2^level voxels sits at their centre
            transforms.append({"type": "translation", "translation": [s * (f - 1) / 2 for s, f in zip(scale, factor)]})
        datasets.append({"path": path, "coordinateTransformations": transforms})
    units = {axis: voxel.unit for axis in axes} if voxel is not None and voxel.unit else None
    write_multiscales_metadata(group, datasets, axes=list(axes), axes_units=units, name=array)
    Image.from_zarr(zarr.open_group(store, mode="r"))  # raises if what was written is not a valid OME image
    return paths


IMAGE_ATTRIBUTES = ("ome", "multiscales")
"""The group attributes that make a Zarr group an OME image (0.5, and 0.4's place)."""


def remove_image(store: str) -> None:
    """Take the OME metadata off ``store`` (its result is being rewritten: no viewer should
    take it for a finished image meanwhile)."""
    group = zarr.open_group(store, mode="r+")
    for key in IMAGE_ATTRIBUTES:
        if key in group.attrs:
            del group.attrs[key]


def _mean(block, axis=None):
    return block.mean(axis=axis, dtype="float64").astype(block.dtype)
