"""Convolution with one point-spread function over a window, through FFTs planned once per task.

A task sees its data only inside its window, but the light recorded near the window's edge
came partly from outside it. The models therefore estimate the object on a domain one PSF
larger than the window (the *object domain*), and :meth:`Convolver.forward` predicts only
the voxels that were observed: no data are invented past the window (no zeros, no mirror).
Richardson-Lucy then divides its back-projection by ``adjoint(ones)``, the weight each object
voxel has in the observed window (Bertero & Boccacci, A&A 437, 2005; the boundary method of
deconwolf, Wernersson et al., Nat. Methods 2024). A tile's core so sees the same data as it
would in the whole volume, and tiles agree with an untiled run once the window's edge is far
enough away (:func:`halo_for`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import threading

import numpy as np

from rqml_dask.models import Array, ArrayBackend, sum_of_squares

UNOBSERVED_WEIGHT = 1e-3
"""Object voxels whose weight in the window (``adjoint(ones)``, at most 1) is below this are
not estimated: they stay 0 (Richardson-Lucy's normalisation would divide by almost nothing)."""


OBJECT_EPSILON = 1e-2
"""Regularises ``1 / |H|^2`` in :meth:`Convolver.object_weights` (BENCHMARKS: "Choosing a
TV-RL strength from the held-out counts")."""

PASSBAND = 1e-4
"""Frequencies where ``|H|^2`` is at most this carry no signal: weight 0 there."""


_OPERATORS: dict[tuple, tuple[Array, Array, Array]] = {}
"""The transfer function, its conjugate and the normalisation of the last :class:`Convolver`
built in this process, by backend, device, PSF digest and shape, image shape and transform
shape: a node's next task of the same tile shape (most of a run's) reuses them instead of
three transforms of its own. One entry, so a process keeps no operator of a shape it has
moved on from."""

_OPERATORS_LOCK = threading.Lock()


def _device(backend: ArrayBackend) -> int | None:
    """The GPU ``backend``'s arrays are made on now (None on the host)."""
    return int(backend.xp.cuda.Device().id) if backend.is_gpu else None


def _read_only(*arrays: Array) -> None:
    """Mark host arrays read-only (a shared operator modified in place fails loudly)."""
    for array in arrays:
        if isinstance(array, np.ndarray):
            array.flags.writeable = False


class Convolver:
    """Blurring of object-domain arrays by one PSF onto a window of ``image_shape``, and its adjoint.

    The object domain has shape ``image_shape + psf_shape - 1``; the window sits in it at
    :attr:`window` (from ``psf_shape // 2`` on every axis). :meth:`forward` is the ``"valid"``
    convolution of an object with the PSF (normalised to unit sum): for an object ``x`` whose
    window is ``w``, it equals ``scipy.signal.convolve(x, psf, mode="valid")`` and, wherever
    ``x`` is zero outside its window, ``scipy.signal.convolve(w, psf, mode="same")``.
    :meth:`adjoint` is its exact adjoint (an image-shaped array to the object domain).
    :attr:`normalisation` is ``1 / adjoint(ones)`` where that weight is at least
    :data:`UNOBSERVED_WEIGHT`, else 0. ``background`` is a known constant the data hold on
    top of the blur (a camera's read-noise pedestal): :meth:`prediction` adds it.

    Both take and return float32 arrays (leading axes beyond the image's are a batch,
    convolved one by one in a single call), each a fresh view into its own FFT buffer that
    callers may modify in place. The models keep their objects *transform-shaped*
    (:attr:`fft_shape`, zero past the object domain at :attr:`domain`: :meth:`extend`), so a
    forward transform pads nothing; :meth:`forward` and :meth:`prediction` take either
    shape. The one transfer function is computed here, and its conjugate kept beside it (a
    second spectrum-sized array per process, shared: one complex pass an adjoint instead
    of three); the adjoint multiplies by the conjugate, with the image-shaped array placed
    where :meth:`forward`'s valid part sits in the transform (a circular correlation of
    length at least the object domain's wraps nothing into it). :meth:`richardson_lucy_factor`
    and :meth:`gradient` take the prediction a check of the same estimate just made and work
    in its buffer.

    ``boundary="circular"`` is the other model, that of most FFT deconvolution tools
    (RedLionfish, DeconvolutionLab2): the window is a torus, what blurs out of one side comes
    back in at the other. The object domain is then the window itself, transformed at its
    own shape (no padding: fast where that shape is, wrong near the edges of a volume that
    does not wrap, which is why it is not the default), the PSF centred on the origin and
    the normalisation 1 everywhere.
    """

    def __init__(self, psf: Array, image_shape: tuple[int, ...], backend: ArrayBackend, background: float = 0.0,
                 boundary: str = "exact") -> None:
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, not {boundary!r}")
        if psf.ndim != len(image_shape) or any(p > n for p, n in zip(psf.shape, image_shape, strict=True)):
            raise ValueError(
                f"psf of shape {psf.shape} does not fit images of shape {image_shape}: "
                "it needs the same rank and at most the image's size on every axis"
            )
        xp = backend.xp
        self.backend = backend
        self.background = float(background)
        self.image_shape = tuple(int(n) for n in image_shape)
        self.circular = boundary == "circular"
        self.object_shape = self.image_shape if self.circular else tuple(n + p - 1 for n, p in zip(image_shape, psf.shape, strict=True))
        window_at = [0 if self.circular else p // 2 for p in psf.shape]
        self.window = tuple(slice(a, a + n) for a, n in zip(window_at, self.image_shape, strict=True))
        """Where the image's voxels sit in the object domain."""
        self._predicted_for: Array | None = None
        self._blurred: Array | None = None
        """The transform-shaped buffer whose valid part is :meth:`prediction` of ``_predicted_for``."""
        self._image_norm: tuple[Array, float] | None = None
        """The last image :meth:`residual_norm` was given, and its squared norm."""
        self.fft_shape = self.image_shape if self.circular else transform_shape(self.image_shape, tuple(psf.shape))
        valid_at = [0 if self.circular else p - 1 for p in psf.shape]  # where forward()'s valid part sits
        self._valid = tuple(slice(a, a + n) for a, n in zip(valid_at, self.image_shape, strict=True))
        self.domain = tuple(slice(0, m) for m in self.object_shape)
        """Where the object domain sits in a transform-shaped array."""
        total = float(xp.sum(xp.astype(psf, xp.float64)))
        if not 0.0 < total < float("inf"):
            raise ValueError(f"psf must have a positive, finite sum, not {total}")
        psf32 = xp.astype(psf, xp.float32)
        psf32 /= total
        self._psf = psf32
        self.psf_digest = hashlib.sha256(np.ascontiguousarray(backend.to_numpy(psf32)).data).hexdigest()
        """Equal digests (and image shapes) mean equal transfer functions: batchable."""
        key = (backend.name, _device(backend), self.psf_digest, tuple(psf.shape), self.image_shape, self.fft_shape, boundary)
        with _OPERATORS_LOCK:
            cached = _OPERATORS.get(key)
            if cached is None:
                _OPERATORS.clear()  # the last task's arrays go before this one's are made
        if cached is None:
            self._otf = backend.rfftn(_centred(xp, psf32, self.fft_shape) if self.circular else psf32, self.fft_shape)
            self._otf_conjugate = xp.conj(self._otf)  # the adjoint multiplies by it: one pass, not three
            weight = self._back_project(backend.rfftn(self._placed(xp.ones(self.image_shape, dtype=xp.float32)), self.fft_shape))
            self._zero_outside(weight, self.domain)
            observed = weight >= UNOBSERVED_WEIGHT
            self.normalisation = xp.astype(xp.where(observed, 1.0 / xp.where(observed, weight, 1.0), 0.0), xp.float32)
            del weight, observed
            _read_only(self._otf, self._otf_conjugate, self.normalisation)
            with _OPERATORS_LOCK:
                _OPERATORS.clear()
                _OPERATORS[key] = (self._otf, self._otf_conjugate, self.normalisation)
        else:
            self._otf, self._otf_conjugate, self.normalisation = cached
        """Transform-shaped: ``1 / adjoint(ones)`` where the object domain is estimated (its
        weight in the window is not negligible), 0 elsewhere and past the object domain.
        Shared, with the transfer function, by every convolver of the process with the same
        PSF and image shape (:data:`_OPERATORS`): never modified."""

    def _blur(self, x: Array) -> Array:
        """``x`` blurred circularly at the transform's shape (a fresh buffer): its
        ``_valid`` part is :meth:`forward`, the rest is wrapped-around partial sums."""
        spectrum = self.backend.rfftn(x, self.fft_shape)
        spectrum *= self._otf
        return self.backend.irfftn(spectrum, self.fft_shape)

    def _back_project(self, spectrum: Array) -> Array:
        """The adjoint of an image-shaped array from the ``spectrum`` (overwritten) of it
        placed in the ``_valid`` part of an otherwise zero transform-shaped array:
        transform-shaped, the adjoint at :attr:`domain`, wrapped-around partial sums past it.
        Callers drop the placed array before this runs: it is not needed any more."""
        spectrum *= self._otf_conjugate
        return self.backend.irfftn(spectrum, self.fft_shape)

    def _zero_outside(self, buffer: Array, region: tuple[slice, ...]) -> None:
        """Zero a transform-shaped ``buffer`` everywhere but ``region``."""
        batch = buffer.ndim - len(self.fft_shape)
        for axis, kept in enumerate(region):
            buffer[_along(batch + axis, slice(0, kept.start))] = 0.0
            buffer[_along(batch + axis, slice(kept.stop, None))] = 0.0

    def _placed(self, r: Array) -> Array:
        """The image-shaped ``r`` in the ``_valid`` part of a zero transform-shaped array."""
        xp = self.backend.xp
        placed = xp.zeros((*r.shape[: r.ndim - len(self.image_shape)], *self.fft_shape), dtype=xp.float32)
        placed[(..., *self._valid)] = r
        return placed

    def object_weights(self, shape: tuple[int, ...], epsilon: float = OBJECT_EPSILON) -> Array:
        """``1 / (|H|^2 + epsilon)`` over the frequencies of an array of ``shape`` (``rfftn``
        layout, float64) where ``|H|^2 > PASSBAND``, 0 elsewhere: ``H`` the PSF's transfer
        function at ``shape`` (the PSF centred on the origin, folded where it is larger)."""
        psf = self.backend.to_numpy(self._psf)
        centred = np.zeros(shape)
        np.add.at(centred, np.ix_(*((np.arange(p) - p // 2) % n for p, n in zip(psf.shape, shape, strict=True))), psf)
        power = np.abs(np.fft.rfftn(centred)) ** 2
        return self.backend.asarray(np.where(power > PASSBAND, 1.0 / (power + epsilon), 0.0))

    def forward(self, x: Array) -> Array:
        """The object ``x`` (object- or transform-shaped) blurred by the PSF, on the window
        (image-shaped)."""
        return self._blur(x)[(..., *self._valid)]

    def adjoint(self, r: Array) -> Array:
        """The adjoint of :meth:`forward` applied to the image-shaped ``r`` (object-shaped)."""
        return self._back_project(self.backend.rfftn(self._placed(r), self.fft_shape))[(..., *self.domain)]

    def _taken_prediction(self, estimate: Array) -> tuple[Array, Array]:
        """The transform-shaped buffer holding :meth:`prediction` of ``estimate`` in its valid
        part, and that part, for the caller to overwrite: the cached one (then forgotten) or
        a fresh one."""
        if self._predicted_for is estimate and self._blurred is not None:
            blurred = self._blurred
            self._predicted_for = self._blurred = None
        else:
            blurred = self._predicted_buffer(estimate)
        return blurred, blurred[(..., *self._valid)]

    def _predicted_buffer(self, estimate: Array) -> Array:
        """:meth:`_blur` of ``estimate`` with ``background`` added to its valid part (:meth:`prediction`)."""
        blurred = self._blur(estimate)
        if self.background:
            blurred[(..., *self._valid)] += self.background
        return blurred

    def richardson_lucy_factor(self, estimate: Array, image: Array, epsilon: float) -> Array:
        """``adjoint(image / (prediction(estimate) + epsilon)) * normalisation``, transform-shaped
        and zero past the object domain (a fresh array; leading axes of both a batch). The ratio is formed in the
        prediction's own buffer, which is then back-projected: one forward and one adjoint
        transform."""
        blurred, ratio = self._taken_prediction(estimate)
        ratio += epsilon
        self.backend.divide_into(image, ratio)
        self._zero_outside(blurred, self._valid)
        spectrum = self.backend.rfftn(blurred, self.fft_shape)
        del blurred, ratio
        correction = self._back_project(spectrum)
        if not self.circular:  # else 1 everywhere
            correction *= self.normalisation
        return correction

    def gradient(self, estimate: Array, image: Array) -> Array:
        """``adjoint(prediction(estimate) - image)``, transform-shaped and zero past the object
        domain (a fresh array): the least-squares gradient, formed in the prediction's own buffer."""
        blurred, residual = self._taken_prediction(estimate)
        residual -= image
        self._zero_outside(blurred, self._valid)
        spectrum = self.backend.rfftn(blurred, self.fft_shape)
        del blurred, residual
        gradient = self._back_project(spectrum)
        self._zero_outside(gradient, self.domain)
        return gradient

    def extend(self, estimate: Array) -> Array:
        """An estimate as a transform-shaped float32 array, zero past the object domain (a
        copy): one of the object domain as it is, one of the window's shape extended by
        repeating its edge voxels."""
        xp = self.backend.xp
        shape = tuple(estimate.shape)
        if shape not in (self.object_shape, self.image_shape):
            raise ValueError(f"estimate shape {shape} is neither the image's {self.image_shape} "
                             f"nor the object domain's {self.object_shape}")
        extended = xp.astype(estimate, xp.float32, copy=False)
        if shape == self.image_shape:
            for axis, (w, m) in enumerate(zip(self.window, self.object_shape)):
                before = _repeat_edge(xp, extended, axis, slice(0, 1), w.start)
                after = _repeat_edge(xp, extended, axis, slice(-1, None), m - w.stop)
                extended = _concat(xp)([*before, extended, *after], axis=axis)
        embedded = xp.zeros(self.fft_shape, dtype=xp.float32)
        embedded[self.domain] = extended
        return embedded

    def prediction(self, estimate: Array) -> Array:
        """What ``estimate`` predicts the data to be, :meth:`forward` plus ``background``,
        kept for the last estimate given, so a check's misfit, its held-out score and the next
        Richardson-Lucy step share one convolution. For estimates that are never modified in place (``immutable_state``
        models); callers must not modify the result."""
        if self._predicted_for is not estimate or self._blurred is None:
            self._predicted_for, self._blurred = None, None  # the previous one's buffer goes first
            self._blurred = self._predicted_buffer(estimate)
            self._predicted_for = estimate
        return self._blurred[(..., *self._valid)]

    def residual_norm(self, estimate: Array, image: Array) -> float:
        """``||prediction(estimate) - image||_2 / ||image||_2``, summed in float64.

        The convolution is :meth:`prediction`'s (the next step reuses it); in float32, whose rounding (~1e-7 relative) is far below any convergence
        tolerance, so a check costs half an iteration rather than the two of a float64
        convolution. A zero ``||image||`` is not divided by.
        """
        xp = self.backend.xp
        if self._image_norm is None or self._image_norm[0] is not image:  # a task's image does not change
            self._image_norm = (image, sum_of_squares(xp, image))
        image_sq = self._image_norm[1]
        residual_sq = sum_of_squares(xp, self.prediction(estimate), image)
        return (residual_sq / (image_sq if image_sq > 0.0 else 1.0)) ** 0.5


BOUNDARIES = ("exact", "circular")
"""The blur models of :class:`Convolver`: ``exact`` (an object one PSF larger than the window,
nothing assumed past it) and ``circular`` (the window wraps around)."""


def _centred(xp, psf: Array, shape: tuple[int, ...]) -> Array:
    """``psf`` zero-padded to ``shape`` and rolled so that its centre voxel (``p // 2``) is at
    the origin: its transform is the transfer function of a centred circular convolution."""
    placed = xp.zeros(shape, dtype=psf.dtype)
    placed[tuple(slice(0, p) for p in psf.shape)] = psf
    return xp.roll(placed, tuple(-(p // 2) for p in psf.shape), axis=tuple(range(psf.ndim)))


PASS_COST = {4: 1.0, 2: 0.9, 3: 1.2, 5: 2.0, 7: 3.1}
"""Relative cost per element of one pass of SciPy's FFT (pocketfft) of each radix (it
factors a length into 4s first, then 2, 3, 5, 7), and :data:`AXIS_COST` that of moving the
data along an axis at all: fitted to 1-D single-precision transforms of every 7-smooth
length from 16 to 700 on this project's machine (``bench/bench_fft_sizes.py`` checks the
shapes they pick). A constant table keeps the transform shape, and so the rounding of every
result, the same on every node."""

AXIS_COST = 6.3

LONGEST_PADDING = 1.25
"""A transform axis is at most this many times the object domain's length (rounded up)."""


def transform_shape(image_shape: tuple[int, ...], psf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a :class:`Convolver` of images of ``image_shape`` and a PSF of ``psf_shape``
    transforms at: per axis a 7-smooth length at least the object domain's ``n + p - 1``
    and at most :data:`LONGEST_PADDING` times it, the combination that costs least by
    :data:`PASS_COST` (a multi-dimensional transform costs its size times the sum of its
    axes' per-element costs: :func:`_per_element`). A circular convolution of length ``L`` >= the object's wraps
    the full result's tail only onto indices before the valid part, and the adjoint's full
    result fits in ``L``; any such length gives the same result up to rounding."""
    domain = [n + p - 1 for n, p in zip(image_shape, psf_shape, strict=True)]
    candidates = [_smooth_lengths(m, math.ceil(m * LONGEST_PADDING)) for m in domain]
    return min(itertools.product(*candidates), key=lambda shape: (math.prod(shape) * sum(map(_per_element, shape)), shape))


@functools.lru_cache(maxsize=4096)
def _per_element(length: int) -> float:
    """The relative cost per element of a 1-D transform of ``length`` (7-smooth), by
    :data:`AXIS_COST` and :data:`PASS_COST`."""
    cost, rest = AXIS_COST, length
    for radix in (4, 2, 3, 5, 7):
        while rest % radix == 0:
            cost += PASS_COST[radix]
            rest //= radix
    return cost


@functools.lru_cache(maxsize=1024)
def _smooth_lengths(low: int, high: int) -> tuple[int, ...]:
    """The 7-smooth lengths in ``[low, high]`` (there is one in ``[m, 1.25 m]`` for every ``m``)."""
    def smooth(n: int) -> bool:
        for radix in (2, 3, 5, 7):
            while n % radix == 0:
                n //= radix
        return n == 1

    return tuple(n for n in range(low, high + 1) if smooth(n))


def halo_for(psf: np.ndarray, iterations: int, tolerance: float = 0.02) -> tuple[int, ...]:
    """The halo, per axis, that keeps a tile's core within about ``tolerance`` of an untiled
    run after ``iterations`` Richardson-Lucy iterations with ``psf``.

    Derived from the PSF's energy, not its size: linearised, ``k`` iterations map the data to
    the estimate by ``sum_{j<k} (1 - H'H)^j H'``, in Fourier ``(1 - (1 - |OTF|^2)^k) /
    |OTF|^2 * conj(OTF)``. Its absolute values, summed over the other axes, give how much data
    at each distance along an axis shapes an estimate voxel; the halo is the distance beyond
    which at most ``tolerance`` of that weight lies. It grows with the PSF's far-reaching
    tails (a widefield PSF's out-of-focus rings) and slowly with ``iterations``."""
    psf = np.asarray(psf, dtype=np.float64)
    grid = tuple(int(8 * p) for p in psf.shape)
    axes = tuple(range(psf.ndim))
    otf = np.fft.rfftn(psf / psf.sum(), grid, axes=axes)
    power = np.abs(otf) ** 2
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        gain = np.where(power > 1e-30, -np.expm1(iterations * np.log1p(-np.minimum(power, 1.0 - 1e-12))) / power,
                        float(iterations))
    kernel = np.abs(np.fft.fftshift(np.fft.irfftn(gain * np.conj(otf), grid, axes=axes)))
    halo = []
    for axis, n in enumerate(grid):
        profile = kernel.sum(axis=tuple(a for a in range(kernel.ndim) if a != axis))
        centre, total = n // 2, float(profile.sum())
        inside = np.cumsum([profile[centre]] + [profile[centre - d] + profile[centre + d] for d in range(1, centre)])
        halo.append(int(np.argmax(inside >= (1.0 - tolerance) * total)))
    return tuple(halo)


def _repeat_edge(xp, x: Array, axis: int, edge: slice, count: int) -> list[Array]:
    """The voxels of ``x`` at ``edge`` along ``axis`` repeated ``count`` times along it, as a
    list of one array to concatenate (empty for no repeat)."""
    if not count:
        return []
    shape = list(x.shape)
    shape[axis] = count
    return [xp.broadcast_to(x[_along(axis, edge)], tuple(shape))]


def _concat(xp):
    """The array API's ``concat``, or ``concatenate`` where a namespace predates it (older CuPy)."""
    return getattr(xp, "concat", None) or xp.concatenate


def _along(axis: int, index: slice) -> tuple:
    """The index that applies ``index`` on ``axis`` and takes every other axis whole."""
    return (slice(None),) * axis + (index, ...)
