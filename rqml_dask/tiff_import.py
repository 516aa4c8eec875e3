"""``rqml data import``: a TIFF stack into a chunked Zarr array a pipeline can read.

The TIFF is read through ``tifffile``'s Zarr view of its pages, a slab of ``chunks[0]``
planes at a time, so memory stays at about one slab however large the file is. The voxel
size comes from the file's ImageJ metadata (``spacing`` for z, the resolution tags for y and
x) unless given; where it is known, the store becomes an OME-Zarr image of the array
(:func:`rqml_dask.ome.write_image`) and a pipeline reading it takes its voxel size along.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tifffile
import zarr

from rqml_dask import ome
from rqml_dask.volumes import InputError

UNITS = {"um": "micrometer", "µm": "micrometer", "\\u00B5m": "micrometer", "micron": "micrometer", "nm": "nanometer",
         "mm": "millimeter"}
"""ImageJ's unit names, as NGFF names them."""


@dataclass(frozen=True)
class ImportedImage:
    """What :func:`import_tiff` wrote: ``store``::``array`` of ``shape`` and ``dtype``,
    chunked ``chunks``; ``voxel`` as found or given (``None``: unknown, no OME metadata)."""

    store: Path
    array: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    voxel: ome.VoxelSize | None


def import_tiff(source: Path, store: Path, array: str = "observed", chunks: tuple[int, ...] | None = None,
                voxel: ome.VoxelSize | None = None, overwrite: bool = False) -> ImportedImage:
    """Copy the first image series of the TIFF ``source`` into ``store``::``array``.

    Raises :class:`~rqml_dask.volumes.InputError` naming the file for what cannot be read
    (not a TIFF, not 2-D or 3-D) and for a ``store`` that holds ``array`` already unless
    ``overwrite``; nothing is written then."""
    try:
        tif = tifffile.TiffFile(source)
    except (OSError, tifffile.TiffFileError) as exc:
        raise InputError(f"{source} is not a readable TIFF file: {exc}") from None
    with tif:
        series = tif.series[0]
        shape = tuple(int(n) for n in series.shape)
        if len(shape) not in (2, 3):
            raise InputError(f"{source}: its first series has axes {series.axes!r}, shape {shape}; "
                             "rqml imports a 2-D image or a 3-D stack (z, y, x)")
        chunks = tuple(min(c, n) for c, n in zip(chunks or (32, 256, 256)[-len(shape):], shape))
        if len(chunks) != len(shape):
            raise InputError(f"--chunks {chunks} has {len(chunks)} axes, {source} has {len(shape)}")
        voxel = voxel or _voxel_of(tif, len(shape))
        if voxel is not None and len(voxel.scale) != len(shape):
            raise InputError(f"voxel size {voxel.scale} has {len(voxel.scale)} axes, {source} has {len(shape)}")
        group = zarr.open_group(store, mode="a")
        if array in group and not overwrite:
            raise InputError(f"{store} holds {array!r} already: pass --overwrite to replace it")
        axes = ("z", "y", "x")[-len(shape):]
        target = group.create_array(array, shape=shape, chunks=chunks, dtype=series.dtype, dimension_names=axes, overwrite=True)
        pages = zarr.open_array(series.aszarr(), mode="r")
        for start in range(0, shape[0], chunks[0]):  # one slab of planes in memory at a time
            stop = min(start + chunks[0], shape[0])
            target[start:stop] = pages[start:stop]
    if voxel is not None:
        ome.write_image(str(store), array, axes, voxel)
    return ImportedImage(store, array, shape, str(series.dtype), chunks, voxel)


def _voxel_of(tif: tifffile.TiffFile, ndim: int) -> ome.VoxelSize | None:
    """The voxel size ImageJ wrote into ``tif`` (``spacing`` and the resolution tags), if any."""
    meta = tif.imagej_metadata or {}
    page = tif.pages[0]
    try:
        x_res, y_res = (page.tags[name].value for name in ("XResolution", "YResolution"))
        x, y = x_res[1] / x_res[0], y_res[1] / y_res[0]
    except (KeyError, ZeroDivisionError):
        return None
    spacing = meta.get("spacing")
    if ndim == 3 and spacing is None or not meta:
        return None
    scale = (float(spacing), y, x) if ndim == 3 else (y, x)
    return ome.VoxelSize(scale, UNITS.get(str(meta.get("unit", "")), None))
