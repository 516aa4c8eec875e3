"""The array backend: which array module a process computes with, and its FFTs.

The module is chosen once per process (:func:`default_backend`): CuPy when a CUDA GPU is
visible, NumPy otherwise. Model code never imports either; it receives an
:class:`ArrayBackend` and uses ``backend.xp`` (an array-API namespace) and the backend's
real-to-complex FFTs, so one implementation serves NumPy, CuPy and a strict array-API
namespace alike.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

Array = Any  # an array of the backend's module: numpy.ndarray, cupy.ndarray, ...


@dataclass(frozen=True)
class ArrayBackend:
    """An array module plus the real FFTs models need.

    ``fft_workers`` is the number of threads SciPy's FFT may use on NumPy (ignored elsewhere).
    """

    xp: ModuleType
    name: str
    fft_workers: int = 1
    _scipy_fft: ModuleType | None = field(default=None, repr=False, compare=False)

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def rfftn(self, x: Array, s: tuple[int, ...]) -> Array:
        """Real FFT over the last ``len(s)`` axes, zero-padded to ``s``; leading axes are a batch."""
        axes = tuple(range(-len(s), 0))
        if self._scipy_fft is not None:
            return self._scipy_fft.rfftn(x, s=s, axes=axes, workers=self.fft_workers)
        return self.xp.fft.rfftn(x, s=s, axes=axes)

    def irfftn(self, x: Array, s: tuple[int, ...]) -> Array:
        """Inverse of :meth:`rfftn`: real output of shape ``s`` over the last ``len(s)`` axes.
        ``x`` is overwritten (on NumPy: SciPy transforms it in place rather than in a copy)."""
        axes = tuple(range(-len(s), 0))
        if self._scipy_fft is not None:
            return self._scipy_fft.irfftn(x, s=s, axes=axes, workers=self.fft_workers, overwrite_x=True)
        return self.xp.fft.irfftn(x, s=s, axes=axes)

    @property
    def has_sine_transforms(self) -> bool:
        """Whether :meth:`sine_transform` is there: SciPy's, on NumPy. (CuPy's
        ``cupyx.scipy.fft`` has them too; not used until measured on a GPU.)"""
        return self._scipy_fft is not None

    def sine_transform(self, x: Array, ndim: int, inverse: bool = False) -> Array:
        """The orthonormal type-II discrete sine transform over the last ``ndim`` axes
        (``inverse``: its inverse, the type III), in ``x``'s precision; leading axes are a
        batch. Only where :attr:`has_sine_transforms`."""
        axes = tuple(range(-ndim, 0))
        transform = self._scipy_fft.idstn if inverse else self._scipy_fft.dstn
        return transform(x, type=2, axes=axes, norm="ortho", workers=self.fft_workers)

    def divide_into(self, numerator: Array, x: Array) -> None:
        """``x[...] = numerator / x``: in place, without a temporary, on NumPy and CuPy."""
        if self.name in ("numpy", "cupy"):
            self.xp.divide(numerator, x, out=x)
        else:
            x[...] = numerator / x

    def clip_below_into(self, x: Array, floor: float) -> None:
        """``x[...] = max(x, floor)``: in place, without a temporary, on NumPy and CuPy."""
        if self.name in ("numpy", "cupy"):
            self.xp.maximum(x, floor, out=x)
        else:
            x[...] = self.xp.maximum(x, floor)

    def asarray(self, host: np.ndarray, dtype: Any = None) -> Array:
        """Move a host (NumPy) array onto this backend."""
        out = self.xp.asarray(host)
        return out if dtype is None else self.xp.astype(out, dtype)

    def to_numpy(self, x: Array) -> np.ndarray:
        """Copy an array of this backend back to host memory."""
        if self.name == "cupy":
            return x.get()
        return np.asarray(x)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the host)."""
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()


SLABS = 8
"""Figures over a whole array (:func:`sum_of_squares`, the held-out score) are summed over
this many slabs of its first axis: their temporaries are an eighth of the array, not whole
copies, at a check, where a task's memory peaks."""


def slabs(length: int) -> list[tuple[slice, ...]]:
    """Indices of the :data:`SLABS` (or fewer) consecutive slabs of an axis of ``length``
    (a first axis: each index is ``(slice, ...)``)."""
    step = max(1, -(-length // SLABS))
    return [(slice(start, min(start + step, length)), ...) for start in range(0, length, step)]


def sum_of_squares(xp: ModuleType, a: Array, b: Array | None = None) -> float:
    """``sum((a - b) ** 2)`` (``sum(a ** 2)`` without ``b``) in float64, slab by slab
    (:func:`slabs`)."""
    if a.ndim == 0:
        a, b = xp.reshape(a, (1,)), None if b is None else xp.reshape(b, (1,))
    total = 0.0
    for slab in slabs(a.shape[0]):
        part = a[slab] * a[slab] if b is None else a[slab] - b[slab]
        if b is not None:
            part *= part
        total += float(xp.sum(part, dtype=xp.float64))
    return total


def inner_products(xp: ModuleType, a: Array, b: Array) -> tuple[float, float]:
    """``sum(a * b)`` and ``sum(b * b)``, accumulated in float64: by ``einsum`` where the
    namespace has it (NumPy, CuPy: no temporary), else slab by slab (:func:`slabs`)."""
    if hasattr(xp, "einsum"):
        return (float(xp.einsum("i,i->", xp.reshape(a, (-1,)), xp.reshape(b, (-1,)), dtype=xp.float64)),
                float(xp.einsum("i,i->", xp.reshape(b, (-1,)), xp.reshape(b, (-1,)), dtype=xp.float64)))
    across = total = 0.0
    for slab in slabs(a.shape[0]):
        part = b[slab]
        across += float(xp.sum(a[slab] * part, dtype=xp.float64))
        total += float(xp.sum(part * part, dtype=xp.float64))
    return across, total


def numpy_backend(fft_workers: int = 1) -> ArrayBackend:
    import scipy.fft

    return ArrayBackend(np, "numpy", fft_workers, scipy.fft)


def cupy_backend() -> ArrayBackend:
    import cupy

    return ArrayBackend(cupy, "cupy")


def gpu_count() -> int:
    """Number of CUDA devices CuPy can see; 0 without CuPy or a driver."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@functools.cache
def default_backend(cpu_threads: int = 1) -> ArrayBackend:
    """CuPy when a GPU is visible (and ``RQML_ARRAY_BACKEND`` does not say otherwise), else
    NumPy whose FFTs use ``cpu_threads`` threads."""
    choice = os.environ.get("RQML_ARRAY_BACKEND", "auto")
    if choice not in ("auto", "numpy", "cupy"):
        raise ValueError(f"RQML_ARRAY_BACKEND={choice!r}: expected auto, numpy or cupy")
    if choice == "cupy" or (choice == "auto" and gpu_count() > 0):
        return cupy_backend()
    return numpy_backend(cpu_threads)
