"""Convolution with one point-spread function, through FFTs planned once per task."""

from __future__ import annotations

from rqml_dask.arrays import Array, ArrayBackend


class Convolver:
    """``"same"``-mode convolution of image-shaped arrays with one PSF, and its adjoint.

    The PSF is normalised to unit sum. :meth:`forward` equals
    ``scipy.signal.convolve(x, psf, mode="same")``: the zero-padded linear convolution
    cropped to the image from ``(psf_shape - 1) // 2`` on every axis. :meth:`adjoint` is its
    exact adjoint: the convolution with ``flip(psf)`` cropped from ``psf_shape // 2``. For an
    odd-sized PSF that is ``scipy.signal.convolve(x, flip(psf), mode="same")``; for an
    even-sized one, that call (scikit-image's back-projection) is one pixel off the adjoint,
    which breaks Landweber's and accelerated Richardson-Lucy's convergence.

    :meth:`forward` and :meth:`adjoint` take and return float32 arrays, each a fresh view
    into its own FFT buffer that callers may modify in place. Their transfer functions are
    computed once here; the float64 one of :meth:`forward64` on its first call.
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
        self.fft_shape = tuple(
            next_fast_len(n + p - 1, True) for n, p in zip(image_shape, psf.shape, strict=True)
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
        self._psf, self._psf_sum = psf, total
        psf32 = xp.astype(psf, xp.float32)
        psf32 /= total
        self._otf = backend.rfftn(psf32, self.fft_shape)
        self._otf_flipped = backend.rfftn(xp.flip(psf32), self.fft_shape)
        self._otf64: Array | None = None

    def _apply(self, x: Array, otf: Array, crop: tuple[slice, ...]) -> Array:
        spectrum = self.backend.rfftn(x, self.fft_shape)
        spectrum *= otf
        return self.backend.irfftn(spectrum, self.fft_shape)[crop]

    def forward(self, x: Array) -> Array:
        """``x`` blurred by the PSF."""
        return self._apply(x, self._otf, self._crop)

    def adjoint(self, x: Array) -> Array:
        """The adjoint of :meth:`forward` applied to ``x`` (correlation with the PSF)."""
        return self._apply(x, self._otf_flipped, self._adjoint_crop)

    def forward64(self, x: Array) -> Array:
        """:meth:`forward` in float64 throughout (``x`` is converted)."""
        xp = self.backend.xp
        if self._otf64 is None:
            psf64 = xp.astype(self._psf, xp.float64)
            psf64 /= self._psf_sum
            self._otf64 = self.backend.rfftn(psf64, self.fft_shape)
        return self._apply(xp.astype(x, xp.float64), self._otf64, self._crop)

    def residual_norm(self, estimate: Array, image: Array) -> float:
        """``||forward(estimate) - image||_2 / ||image||_2`` in float64 (not divided by a
        zero ``||image||``)."""
        xp = self.backend.xp
        residual = self.forward64(estimate)
        residual -= image
        residual *= residual
        image64 = xp.astype(image, xp.float64)
        image64 *= image64
        image_sq = float(xp.sum(image64))
        return (float(xp.sum(residual)) / (image_sq if image_sq > 0.0 else 1.0)) ** 0.5
