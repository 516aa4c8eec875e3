"""Camera data: raw values in ADU (analog-digital units) turned into photon counts.

A camera reports ``ADU = gain * photons + offset`` plus Gaussian read noise: ``offset`` is
the dark level (often 100 ADU), ``gain`` the ADU per detected photon, ``read_noise`` the
noise's standard deviation in ADU. The deconvolution models and the held-out stopping rule
need Poisson counts, so a task reads its window as ``(raw - offset) / gain + s^2`` with
``s = read_noise / gain`` (:meth:`Camera.photons`), rounded to whole counts and clipped at
0: the shifted-Poisson approximation of Poisson-Gaussian data (Snyder, Hammoud & White,
JOSA A 1993), whose mean and variance are both ``photons + s^2``. The pedestal ``s^2``
(:attr:`Camera.pedestal`) is a known background the models add to their prediction, so
the result is in photons without it; without it, binomial thinning would split the read
noise between the halves and the held-out score would reward fitting it.

:func:`estimate_camera` finds offset and gain from a few chunks of the data (no dark
frame): the gain is the slope of the variance-mean relation over local patches, the
offset where the darkest patches' variance would be photons' alone. :func:`offset_floor`
is the level of an integer image's darkest values, which, well above 0, says the image is
camera data and not photon counts. Numpy only: no Dask, no task, no Zarr I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import ConfigDict, Field


@dataclass(frozen=True)
class Camera:
    """``ADU = gain * photons + offset + N(0, read_noise^2)``: ``offset`` in ADU (>= 0),
    ``gain`` in ADU per photon (> 0), ``read_noise`` in ADU (>= 0)."""

    __pydantic_config__ = ConfigDict(extra="forbid", frozen=True)

    offset: Annotated[float, Field(ge=0)]
    gain: Annotated[float, Field(gt=0)]
    read_noise: Annotated[float, Field(ge=0)] = 0.0

    @property
    def pedestal(self) -> float:
        """``(read_noise / gain)^2``: the counts :meth:`photons` adds to every voxel."""
        return (self.read_noise / self.gain) ** 2

    def photons(self, raw: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """``raw`` (ADU) as shifted-Poisson counts in ``dtype``: ``(raw - offset) / gain +
        pedestal`` rounded to whole counts (the held-out rule thins whole counts) and clipped
        at 0 (what read noise leaves below that is a count of no photon)."""
        photons = (np.asarray(raw, dtype=np.float64) - self.offset) / self.gain + self.pedestal
        return np.clip(np.rint(photons), 0, None).astype(dtype, copy=False)

    def __str__(self) -> str:
        noise = f", read noise {self.read_noise:.2f} ADU" if self.read_noise else ""
        return f"offset {self.offset:.1f} ADU, gain {self.gain:.2f} ADU/photon{noise}"


OFFSET_FLOOR = 10.0
"""ADU: an integer image whose darkest values (:func:`offset_floor`) are at least this is
taken for camera data with an offset, and refused unless ``input.camera`` says how to read it."""
FLOOR_PERCENTILE = 0.5
"""The percentile of a sample that is its floor: a few dead pixels at 0 do not hide an offset."""
SAMPLE_CHUNKS = 4
"""How many chunks of an image are read to estimate its camera or check its floor."""
MAX_GAIN_ERROR = 0.15
"""The largest relative standard error of an estimated gain that is used."""
PATCH = (8, 16)
"""Rows and columns (the image's last two axes) of the patches the variance-mean fit uses."""
GROUPS = 16


class CameraEstimateError(ValueError):
    """Data from which no camera can be estimated (too small, or too little range of intensity)."""


@dataclass(frozen=True)
class CameraEstimate:
    """An estimated camera, the gain's standard error (ADU per photon), and the sample it
    came from: ``voxels`` values in ``chunks`` chunks."""

    camera: Camera
    gain_error: float
    voxels: int
    chunks: int

    def __str__(self) -> str:
        return (f"{self.camera} (estimated from {self.chunks} chunk(s), {self.voxels} voxels; gain "
                f"+- {self.gain_error:.2f})")


def sample_chunks(array, count: int = SAMPLE_CHUNKS) -> list[np.ndarray]:
    """At most ``count`` whole chunks of the Zarr ``array``, spread evenly over its chunk grid
    (the first, the last, and between): never the whole image."""
    grid = tuple(-(-n // c) for n, c in zip(array.shape, array.chunks))
    total = int(np.prod(grid))
    picks = sorted({int(i) for i in np.linspace(0, total - 1, min(count, total)).round()})
    chunks = []
    for flat in picks:
        index = np.unravel_index(flat, grid)
        chunks.append(np.asarray(array[tuple(slice(i * c, min((i + 1) * c, n))
                                             for i, c, n in zip(index, array.chunks, array.shape))]))
    return chunks


def offset_floor(sample: list[np.ndarray]) -> float:
    """The level of the darkest values of ``sample``: its :data:`FLOOR_PERCENTILE` percentile."""
    return float(np.percentile(np.concatenate([np.ravel(c) for c in sample]), FLOOR_PERCENTILE))


def estimate_camera(sample: list[np.ndarray]) -> CameraEstimate:
    """Offset and gain of camera data from ``sample`` (chunks of it, in ADU), or
    :class:`CameraEstimateError`.

    Photons scaled by the gain have ``var(ADU) = gain * (mean(ADU) - offset) + read_noise^2``.
    Over patches of :data:`PATCH` voxels in the last two axes, the variance is that of the
    second difference along both of them (``[1,-2,1]`` by ``[1,-2,1]``, 36 times the noise
    variance; a smooth, blurred signal mostly cancels) and the mean is weighted as the
    squared stencil weights the voxels, so each patch's pair follows the same line. The
    patches are ranked by the mean of one part of each and the figures taken over another
    part, so that a patch's noise does not pick its rank; the slope of a line through the
    ranks' :data:`GROUPS` averages is the gain. The offset is where the darkest group's
    variance would be explained by photons alone: the true offset less
    ``read_noise^2 / gain``, which leaves the read noise as a pedestal of
    ``(read_noise / gain)^2`` photons, the shifted-Poisson approximation of Poisson-Gaussian data.
    Refused if the gain's relative standard error exceeds :data:`MAX_GAIN_ERROR` (data with
    too little range of intensity: a dark or sparse sample)."""
    keys, means, variances = [], [], []
    for chunk in sample:
        k, m, v = _patch_figures(np.asarray(chunk, dtype=np.float64))
        keys.append(k), means.append(m), variances.append(v)
    key, mean, variance = np.concatenate(keys), np.concatenate(means), np.concatenate(variances)
    voxels = int(sum(np.size(c) for c in sample))
    if key.size < 2 * GROUPS:
        raise CameraEstimateError(f"{voxels} sampled voxels are too few to estimate the camera (need {2 * GROUPS} "
                                  f"patches of {PATCH[0]}x{PATCH[1]} in the last two axes)")
    groups = np.array_split(np.argsort(key, kind="stable"), GROUPS)
    group_mean = np.array([mean[g].mean() for g in groups])
    group_variance = np.array([variance[g].mean() for g in groups])
    (gain, _), cov = np.polyfit(group_mean, group_variance, 1, cov=True)
    error = float(np.sqrt(max(cov[0, 0], 0.0)))
    if not gain > 0 or error > MAX_GAIN_ERROR * gain:
        raise CameraEstimateError(f"too little range of intensity in {voxels} sampled voxels to estimate the gain "
                                  f"(variance-mean slope {gain:.3g} +- {error:.2g} ADU/photon)")
    offset = float(np.clip(group_mean[0] - group_variance[0] / gain, 0.0, group_mean[0]))
    return CameraEstimate(Camera(offset=offset, gain=float(gain)), error, voxels, len(sample))


def _patch_figures(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch of ``chunk`` (its last two axes cut into :data:`PATCH` patches; a 1-D
    chunk has none): the rank key (weighted mean of its first columns), and the weighted
    mean and noise variance of its last columns."""
    if chunk.ndim < 2:
        empty = np.empty(0)
        return empty, empty, empty
    x = chunk.reshape(-1, *chunk.shape[-2:])
    second = x[..., :-2] - 2 * x[..., 1:-1] + x[..., 2:]
    weighted = (x[..., :-2] + 4 * x[..., 1:-1] + x[..., 2:]) / 6
    second = second[:, :-2] - 2 * second[:, 1:-1] + second[:, 2:]
    weighted = (weighted[:, :-2] + 4 * weighted[:, 1:-1] + weighted[:, 2:]) / 6
    rows, cols = PATCH
    planes, ny, nx = second.shape[0], second.shape[1] // rows, second.shape[2] // cols

    def patches(a: np.ndarray) -> np.ndarray:
        a = a[:, : ny * rows, : nx * cols].reshape(planes, ny, rows, nx, cols)
        return a.transpose(0, 1, 3, 2, 4).reshape(-1, rows, cols)

    second, weighted = patches(second), patches(weighted)
    half = cols // 2  # two columns between the parts: their stencils share no voxel
    key = weighted[..., : half - 2].mean(axis=(1, 2))
    mean = weighted[..., half:].mean(axis=(1, 2))
    variance = (second[..., half:] ** 2).mean(axis=(1, 2)) / 36.0
    return key, mean, variance
