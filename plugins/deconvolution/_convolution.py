"""Convolution with one point-spread function, through FFTs planned once per task."""

from __future__ import annotations

import hashlib

import numpy as np

from rqml_dask.models import Array, ArrayBackend


class Convolver:
    """``"same"``-mode convolution of image-shaped arrays with one PSF, and its adjoint.

    The PSF is normalised to unit sum. :meth:`forward` equals
    ``scipy.signal.convolve(x, psf, mode="same")``: the zero-padded linear convolution
    cropped to the image from ``(psf_shape - 1) // 2`` on every axis. :meth:`adjoint` is its
    exact adjoint: the convolution with ``flip(psf)`` cropped from ``psf_shape // 2``. For an
    odd-sized PSF that is ``scipy.signal.convolve(x, flip(psf), mode="same")``; for an
    even-sized one, that call (scikit-image's back-projection) is one pixel off the adjoint,
    which breaks Landweber's and accelerated Richardson-Lucy's convergence.

    :meth:`forward` and :meth:`adjoint` take and return float32 arrays (leading axes beyond
    the image's are a batch, convolved one by one in a single call), each a fresh view
    into its own FFT buffer that callers may modify in place. Their transfer functions are
    computed once here.
    """

    def __init__(self, psf: Array, image_shape: tuple[int, ...], backend: ArrayBackend) -> None:
        from scipy.fft import next_fast_len

        if psf.ndim != len(image_shape) or any(
            p > n for p, n in zip(psf.shape, image_shape, strict=True)
        ):
            raise ValueError(
                f"psf of shape {psf.shape} does not fit images of shape {image_shape}: "
                "it needs the same rank and at most the image's size on every axis"
            )
        xp = backend.xp
        self.backend = backend
        self._blurred_for: Array | None = None
        self._blurred: Array | None = None
        # A circular convolution of length L equals the linear one on the cropped outputs
        # once L >= n + p // 2: the wrapped-around tail of the full (n + p - 1) result then
        # lands only on indices before the crop. That is up to p // 2 shorter than the full
        # length, and so cheaper, with identical results.
        self.fft_shape = tuple(
            next_fast_len(n + p // 2, True) for n, p in zip(image_shape, psf.shape, strict=True)
        )
        self._crop = tuple(
            slice((p - 1) // 2, (p - 1) // 2 + n)
            for n, p in zip(image_shape, psf.shape, strict=True)
        )
        self._adjoint_crop = tuple(
            slice(p // 2, p // 2 + n) for n, p in zip(image_shape, psf.shape, strict=True)
        )
        total = float(xp.sum(xp.astype(psf, xp.float64)))
        if not 0.0 < total < float("inf"):
            raise ValueError(f"psf must have a positive, finite sum, not {total}")
        psf32 = xp.astype(psf, xp.float32)
        psf32 /= total
        self.psf_digest = hashlib.sha256(np.ascontiguousarray(backend.to_numpy(psf32)).data).hexdigest()
        """Equal digests (and image shapes) mean equal transfer functions: batchable."""
        self._otf = backend.rfftn(psf32, self.fft_shape)
        self._otf_flipped = backend.rfftn(xp.flip(psf32), self.fft_shape)

    def _apply(self, x: Array, otf: Array, crop: tuple[slice, ...]) -> Array:
        spectrum = self.backend.rfftn(x, self.fft_shape)
        spectrum *= otf
        return self.backend.irfftn(spectrum, self.fft_shape)[(..., *crop)]

    def forward(self, x: Array) -> Array:
        """``x`` blurred by the PSF."""
        return self._apply(x, self._otf, self._crop)

    def adjoint(self, x: Array) -> Array:
        """The adjoint of :meth:`forward` applied to ``x`` (correlation with the PSF)."""
        return self._apply(x, self._otf_flipped, self._adjoint_crop)

    def blurred(self, estimate: Array) -> Array:
        """:meth:`forward` of ``estimate``, kept for the last estimate given, so a check's
        misfit and its held-out score share one convolution. For estimates that are never
        modified in place (``immutable_state`` models); callers must not modify the result."""
        if self._blurred_for is not estimate:
            self._blurred_for, self._blurred = estimate, self.forward(estimate)
        return self._blurred

    def residual_norm(self, estimate: Array, image: Array) -> float:
        """``||forward(estimate) - image||_2 / ||image||_2``, summed in float64.

        The convolution is recomputed here (:meth:`blurred`), apart from any iteration's own
        arithmetic; in float32, whose rounding (~1e-7 relative) is far below any convergence
        tolerance, so a check costs half an iteration rather than the two of a float64
        convolution. A zero ``||image||`` is not divided by.
        """
        xp = self.backend.xp
        residual = self.blurred(estimate) - image
        image_sq = float(xp.sum(image * image, dtype=xp.float64))
        residual_sq = float(xp.sum(residual * residual, dtype=xp.float64))
        return (residual_sq / (image_sq if image_sq > 0.0 else 1.0)) ** 0.5
