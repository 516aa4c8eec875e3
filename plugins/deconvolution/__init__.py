"""The deconvolution task class and its built-in model families."""

from __future__ import annotations

from typing import Any

import numpy as np

from rqml_dask.models import Array, ArrayBackend, TaskClass


class Deconvolution(TaskClass):
    """A tile of a fluorescence volume (photon counts) blurred by a known PSF.

    The operator is the PSF, read whole by every task: it has the image's rank, is no larger
    than the image on any axis, is finite and non-negative with a positive sum. The halo is
    derived from the PSF's energy and the iteration count
    (:func:`~rqml_plugins.deconvolution._convolution.halo_for`): what keeps a tile's core
    within 2 % of an untiled run.
    """

    name = "deconvolution"
    operator_key = "psf"
    default_operator = "psf"
    default_output = "deconvolved"
    dtype = "float32"
    photon_counts = True
    data_is_estimate = True

    def image_axes(self, ndim: int) -> tuple[str, ...] | None:
        return ("z", "y", "x")[-ndim:] if 2 <= ndim <= 3 else None

    def read_operator(self, operator: Any, core: tuple[tuple[int, int], ...], image_shape: tuple[int, ...]) -> np.ndarray:
        psf = np.asarray(operator[...], dtype=np.float32)
        if psf.ndim != len(image_shape):
            raise ValueError(f"has rank {psf.ndim} but the image has rank {len(image_shape)}")
        if any(p > n for p, n in zip(psf.shape, image_shape)):
            raise ValueError(f"{psf.shape} is larger than the image {tuple(image_shape)}")
        if not np.all(np.isfinite(psf)) or psf.sum() <= 0 or psf.min() < 0:
            raise ValueError("must be finite, non-negative and have a positive sum")
        return psf

    def halo(self, operator: np.ndarray, image_ndim: int, iterations: int) -> tuple[int, ...]:
        from rqml_plugins.deconvolution._convolution import halo_for

        return halo_for(operator, iterations)

    def transform_shape(self, operator: np.ndarray, window_shape: tuple[int, ...]) -> tuple[int, ...]:
        from rqml_plugins.deconvolution._convolution import transform_shape

        return transform_shape(window_shape, tuple(operator.shape))

    def probe_problem(self, backend: ArrayBackend) -> dict[str, Array]:
        grid = np.indices((8, 12, 12), dtype=np.float32)
        image = 1.0 + np.exp(-(((grid - np.array([4, 6, 6], np.float32)[:, None, None, None]) ** 2).sum(0)) / 4)
        psf = np.exp(-(((np.indices((3, 5, 5), dtype=np.float32) - np.array([1, 2, 2], np.float32)[:, None, None, None]) ** 2).sum(0)))
        image = backend.asarray(image.astype(np.float32))
        return {"image": image, "observed": image, "psf": backend.asarray((psf / psf.sum()).astype(np.float32))}
